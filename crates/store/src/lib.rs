//! The parameter store (Cerebras' MemoryX): fp32 master weights, AdamW
//! moments and gradient accumulators, one slab per layer, in a DRAM tier
//! with a byte budget backed by a flash tier of slab files; the optimizer
//! runs here, where the gradients arrive.
//!
//! - A slab holds the tensors its layer owns (a tensor is owned by the first
//!   layer that lists it: the tied token embedding belongs to the embedding
//!   layer and is read from there for the head). Its bytes are four regions
//!   of n floats: weights, gradient accumulator, first and second moments.
//! - The flash tier holds every slab (a file each, read and written whole
//!   with positioned I/O on 4 KiB-aligned buffers); the DRAM tier holds the
//!   slabs that fit the budget. The order of accesses is known (the
//!   schedule), so eviction is Belady's: the resident slab needed furthest in
//!   the future goes, never the one needed next. Every slab read from flash
//!   is checked against the CRC32 of what was written.
//! - A step's gradient contributions are added in arrival order, which the
//!   schedule fixes; when a tensor has all its contributions its sum of
//!   squares is taken; when the step is complete the global norm gives the
//!   clip factor and every slab gets a pending update, applied when the slab
//!   is next used (so the next step's forward of layer l overlaps the update
//!   of layer l+1), or at a flush. No staleness: the weights a step reads are
//!   always fully updated.
//!
//! What is not here: transport (the caller moves the bytes), scheduling.

mod checkpoint;
mod slab;

pub use checkpoint::{read_manifest, Manifest, SlabEntry, MANIFEST};
pub use slab::AlignedBuf;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use ws_kernels::adamw::{adamw_update, AdamWStep};
use ws_model::{ModelSpec, Params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store: slab file {path} (layer {layer}) is corrupt: checksum {found:08x}, expected {expected:08x}")]
    Corrupt { path: PathBuf, layer: usize, found: u32, expected: u32 },
    #[error("store: DRAM budget of {budget} bytes is below the {needed} bytes one layer's slabs need at once; raise store.dram_bytes")]
    BudgetTooSmall { budget: u64, needed: u64 },
    #[error("store: checkpoint {path}: {problem}")]
    Checkpoint { path: PathBuf, problem: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}

/// Where each tensor lives: slab and offset (in floats) in its weight region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Floats per region of each slab (its owned parameters).
    pub slab_params: Vec<usize>,
    /// Per tensor: (slab, offset).
    pub place: Vec<(usize, usize)>,
    /// Per slab: the tensors it owns, in order.
    pub owned: Vec<Vec<usize>>,
    /// Per layer: the slabs its tensors live in, ascending.
    pub layer_slabs: Vec<Vec<usize>>,
}

impl Layout {
    pub fn new(spec: &ModelSpec) -> Layout {
        let n_layers = spec.layer_count();
        let mut place = vec![(usize::MAX, 0); spec.tensors.len()];
        let mut owned = vec![Vec::new(); n_layers];
        let mut slab_params = vec![0; n_layers];
        for (l, layer) in spec.layers.iter().enumerate() {
            for &t in &layer.tensors {
                if place[t].0 == usize::MAX {
                    place[t] = (l, slab_params[l]);
                    slab_params[l] += spec.tensors[t].numel();
                    owned[l].push(t);
                }
            }
        }
        let layer_slabs = spec
            .layers
            .iter()
            .map(|layer| {
                let mut s: Vec<usize> = layer.tensors.iter().map(|&t| place[t].0).collect();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        Layout { slab_params, place, owned, layer_slabs }
    }

    /// Bytes of a slab in DRAM and on flash (four fp32 regions).
    pub fn slab_bytes(&self, slab: usize) -> u64 {
        16 * self.slab_params[slab] as u64
    }

    /// The smallest DRAM budget that works: the slabs of the largest layer.
    pub fn min_dram_bytes(&self) -> u64 {
        self.layer_slabs.iter().map(|ss| ss.iter().map(|&s| self.slab_bytes(s)).sum::<u64>()).max().unwrap_or(0)
    }

    /// Floats of one layer's weights as streamed (its tensors in layer order).
    pub fn layer_params(&self, spec: &ModelSpec, layer: usize) -> usize {
        spec.layers[layer].tensors.iter().map(|&t| spec.tensors[t].numel()).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_clip: f64,
}

/// An update recorded at the end of a step, applied to each slab before
/// its next use.
#[derive(Clone, Copy, Debug)]
struct PendingUpdate {
    lr: f32,
    t: u64,
    grad_scale: f32,
}

struct Slab {
    /// In DRAM when `Some`.
    dram: Option<AlignedBuf>,
    /// DRAM copy differs from flash.
    dirty: bool,
    /// CRC32 of the slab file's bytes as last written.
    crc: u32,
    pending: Option<PendingUpdate>,
}

/// Measured use of the DRAM tier and traffic to flash, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub dram_bytes: u64,
    pub dram_bytes_peak: u64,
    pub flash_read_bytes: u64,
    pub flash_write_bytes: u64,
    /// Slab reads from flash (a cold start reads each slab once).
    pub flash_reads: u64,
}

pub struct Store {
    spec: ModelSpec,
    layout: Layout,
    dir: PathBuf,
    slabs: Vec<Slab>,
    dram_budget: u64,
    stats: StoreStats,
    opt: OptimizerConfig,
    /// The step whose weights the slabs hold once pending updates are applied.
    pub version: u64,
    /// Contributions still expected this step, per tensor.
    contributions_left: Vec<usize>,
    contributions_per_step: Vec<usize>,
    /// Sum of squares of each tensor's complete gradient this step.
    grad_sq: Vec<f64>,
    /// The access sequence of one step (slab lists), for eviction.
    sequence: Vec<Vec<usize>>,
    cursor: usize,
}

impl Store {
    /// A store in `dir` (created; slab files written there) holding
    /// `params` as the weights of version `version`, zero moments unless
    /// given. `micro_batches` is how many contributions each layer sends per step.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        spec: &ModelSpec,
        params: &Params,
        moments: Option<(&Params, &Params)>,
        version: u64,
        dir: &Path,
        dram_budget: u64,
        opt: OptimizerConfig,
        micro_batches: usize,
    ) -> Result<Store> {
        let layout = Layout::new(spec);
        Store::create_with(spec, version, dir, dram_budget, opt, micro_batches, |s, buf| {
            let n = layout.slab_params[s];
            for &t in &layout.owned[s] {
                let off = layout.place[t].1;
                let len = spec.tensors[t].numel();
                buf[off..off + len].copy_from_slice(&params.tensors[t]);
                if let Some((m, v)) = moments {
                    buf[2 * n + off..2 * n + off + len].copy_from_slice(&m.tensors[t]);
                    buf[3 * n + off..3 * n + off + len].copy_from_slice(&v.tensors[t]);
                }
            }
            Ok(())
        })
    }

    /// A store whose slabs `fill(slab, buffer)` writes, one at a time (so a
    /// model larger than memory never exists whole in DRAM). The buffer is
    /// zeroed, laid out weights | gradient | first moment | second moment.
    #[allow(clippy::too_many_arguments)]
    pub fn create_with(
        spec: &ModelSpec,
        version: u64,
        dir: &Path,
        dram_budget: u64,
        opt: OptimizerConfig,
        micro_batches: usize,
        mut fill: impl FnMut(usize, &mut [f32]) -> Result<()>,
    ) -> Result<Store> {
        let layout = Layout::new(spec);
        let needed = layout.min_dram_bytes();
        if dram_budget < needed {
            return Err(StoreError::BudgetTooSmall { budget: dram_budget, needed });
        }
        std::fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
        let mut contributions_per_step = vec![0; spec.tensors.len()];
        for layer in &spec.layers {
            for &t in &layer.tensors {
                contributions_per_step[t] += micro_batches;
            }
        }
        let mut store = Store {
            spec: spec.clone(),
            slabs: (0..spec.layer_count()).map(|_| Slab { dram: None, dirty: false, crc: 0, pending: None }).collect(),
            layout,
            dir: dir.to_path_buf(),
            dram_budget,
            stats: StoreStats::default(),
            opt,
            version,
            contributions_left: contributions_per_step.clone(),
            contributions_per_step,
            grad_sq: vec![0.0; spec.tensors.len()],
            sequence: Vec::new(),
            cursor: 0,
        };
        // Every slab goes to flash first: the flash tier holds everything.
        for s in 0..store.slabs.len() {
            let mut buf = AlignedBuf::zeroed(store.layout.slab_params[s] * 4);
            fill(s, &mut buf)?;
            store.write_slab(s, &buf)?;
        }
        Ok(store)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// The order in which one step touches layers (forward, head, backward
    /// uses); eviction keeps what comes next.
    pub fn set_access_sequence(&mut self, layers: &[usize]) {
        self.sequence = layers.iter().map(|&l| self.layout.layer_slabs[l].clone()).collect();
        self.cursor = 0;
    }

    fn slab_path(&self, s: usize) -> PathBuf {
        self.dir.join(format!("slab-{s:05}.bin"))
    }

    fn write_slab(&mut self, s: usize, buf: &AlignedBuf) -> Result<()> {
        let path = self.slab_path(s);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open slab file", &path))?;
        let bytes = buf.as_bytes();
        file.write_all_at(bytes, 0).map_err(io("cannot write slab file", &path))?;
        self.slabs[s].crc = crc32fast::hash(bytes);
        self.stats.flash_write_bytes += bytes.len() as u64;
        Ok(())
    }

    fn read_slab(&mut self, s: usize) -> Result<AlignedBuf> {
        let path = self.slab_path(s);
        let file = std::fs::File::open(&path).map_err(io("cannot open slab file", &path))?;
        let mut buf = AlignedBuf::zeroed(self.layout.slab_params[s] * 4);
        file.read_exact_at(buf.as_bytes_mut(), 0).map_err(io("cannot read slab file", &path))?;
        let found = crc32fast::hash(buf.as_bytes());
        if found != self.slabs[s].crc {
            return Err(StoreError::Corrupt { path, layer: s, found, expected: self.slabs[s].crc });
        }
        self.stats.flash_read_bytes += buf.as_bytes().len() as u64;
        self.stats.flash_reads += 1;
        Ok(buf)
    }

    /// Distance (in accesses) from the cursor to the next use of slab `s`.
    fn next_use(&self, s: usize) -> usize {
        let n = self.sequence.len();
        (0..n).find(|i| self.sequence[(self.cursor + i) % n].contains(&s)).unwrap_or(usize::MAX)
    }

    /// Brings slab `s` into DRAM, evicting others (keeping those in `keep`).
    fn ensure_resident(&mut self, s: usize, keep: &[usize]) -> Result<()> {
        if self.slabs[s].dram.is_some() {
            return Ok(());
        }
        let need = self.layout.slab_bytes(s);
        while self.stats.dram_bytes + need > self.dram_budget {
            let victim = (0..self.slabs.len())
                .filter(|&v| self.slabs[v].dram.is_some() && v != s && !keep.contains(&v))
                .max_by_key(|&v| (self.next_use(v), v))
                .expect("the budget holds one layer's slabs (checked at creation)");
            self.evict(victim)?;
        }
        let buf = self.read_slab(s)?;
        self.slabs[s].dram = Some(buf);
        self.slabs[s].dirty = false;
        self.stats.dram_bytes += need;
        self.stats.dram_bytes_peak = self.stats.dram_bytes_peak.max(self.stats.dram_bytes);
        Ok(())
    }

    fn evict(&mut self, s: usize) -> Result<()> {
        let buf = self.slabs[s].dram.take().expect("evicting a resident slab");
        if self.slabs[s].dirty {
            self.write_slab(s, &buf)?;
            self.slabs[s].dirty = false;
        }
        self.stats.dram_bytes -= self.layout.slab_bytes(s);
        Ok(())
    }

    /// Applies the pending update of slab `s` (which must be resident).
    fn apply_pending(&mut self, s: usize) {
        let Some(p) = self.slabs[s].pending.take() else { return };
        let n = self.layout.slab_params[s];
        let buf = self.slabs[s].dram.as_mut().expect("resident");
        let (w, rest) = buf.split_at_mut(n);
        let (g, rest) = rest.split_at_mut(n);
        let (m, v) = rest.split_at_mut(n);
        for &t in &self.layout.owned[s] {
            let (off, len) = (self.layout.place[t].1, self.spec.tensors[t].numel());
            let r = off..off + len;
            let step = AdamWStep {
                lr: p.lr,
                beta1: self.opt.beta1,
                beta2: self.opt.beta2,
                eps: self.opt.eps,
                weight_decay: if self.spec.tensors[t].decay { self.opt.weight_decay } else { 0.0 },
                t: p.t,
                grad_scale: p.grad_scale,
            };
            adamw_update(&mut w[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r], step);
        }
        g.fill(0.0);
        self.slabs[s].dirty = true;
    }

    /// Makes the slabs of `layer` resident and up to date, and advances the
    /// eviction cursor past this access.
    fn prepare_layer(&mut self, layer: usize) -> Result<()> {
        let slabs = self.layout.layer_slabs[layer].clone();
        for &s in &slabs {
            self.ensure_resident(s, &slabs)?;
            self.apply_pending(s);
        }
        if !self.sequence.is_empty() {
            self.cursor = (self.cursor + 1) % self.sequence.len();
        }
        Ok(())
    }

    /// Copies the weights of `layer` (its tensors in layer order) into `out`.
    pub fn read_layer(&mut self, layer: usize, out: &mut [f32]) -> Result<()> {
        self.prepare_layer(layer)?;
        let mut o = 0;
        for &t in &self.spec.layers[layer].tensors {
            let (s, off) = self.layout.place[t];
            let len = self.spec.tensors[t].numel();
            let w = &self.slabs[s].dram.as_ref().expect("resident")[off..off + len];
            out[o..o + len].copy_from_slice(w);
            o += len;
        }
        assert_eq!(o, out.len(), "layer {layer}: buffer of {} floats for {o}", out.len());
        Ok(())
    }

    /// Adds one contribution to the gradients of `layer` (its tensors in
    /// layer order, as the worker computed them).
    pub fn accumulate(&mut self, layer: usize, grads: &[f32]) -> Result<()> {
        let slabs = self.layout.layer_slabs[layer].clone();
        for &s in &slabs {
            self.ensure_resident(s, &slabs)?;
            self.apply_pending(s);
        }
        let mut o = 0;
        for &t in &self.spec.layers[layer].tensors {
            let (s, off) = self.layout.place[t];
            let len = self.spec.tensors[t].numel();
            let n = self.layout.slab_params[s];
            let buf = self.slabs[s].dram.as_mut().expect("resident");
            let g = &mut buf[n + off..n + off + len];
            ws_kernels::parallel::add_inplace(g, &grads[o..o + len]);
            assert!(self.contributions_left[t] > 0, "more contributions to tensor {t} than the schedule sends");
            self.contributions_left[t] -= 1;
            if self.contributions_left[t] == 0 {
                self.grad_sq[t] = ws_kernels::math::sum_of_squares_f64(g);
            }
            self.slabs[s].dirty = true;
            o += len;
        }
        assert_eq!(o, grads.len());
        Ok(())
    }

    /// Closes the step: global norm from the complete gradients, clip
    /// factor, and a pending AdamW update (step `t` = version + 1) on every
    /// slab. Returns the gradient norm before clipping.
    pub fn finish_step(&mut self, lr: f64) -> f64 {
        assert!(self.contributions_left.iter().all(|&c| c == 0), "a step closed before every contribution arrived");
        let norm = self.grad_sq.iter().sum::<f64>().sqrt();
        let grad_scale = clip_factor(norm, self.opt.grad_clip);
        self.version += 1;
        let update = PendingUpdate { lr: lr as f32, t: self.version, grad_scale };
        for s in &mut self.slabs {
            assert!(s.pending.is_none(), "a slab skipped its previous update");
            s.pending = Some(update);
        }
        self.contributions_left.clone_from(&self.contributions_per_step);
        norm
    }

    /// Applies every pending update (before a checkpoint or an export).
    pub fn flush(&mut self) -> Result<()> {
        for s in 0..self.slabs.len() {
            if self.slabs[s].pending.is_some() {
                self.ensure_resident(s, &[s])?;
                self.apply_pending(s);
            }
        }
        Ok(())
    }

    /// Weights and moments of every tensor (after [`Self::flush`]); for
    /// checkpoints, export and tests. Slabs not in DRAM are read from flash.
    pub fn snapshot(&mut self) -> Result<(Params, Params, Params)> {
        self.flush()?;
        let (mut w, mut m, mut v) = (Params::zeros(&self.spec), Params::zeros(&self.spec), Params::zeros(&self.spec));
        for s in 0..self.slabs.len() {
            let n = self.layout.slab_params[s];
            let loaded;
            let buf = match &self.slabs[s].dram {
                Some(b) => b,
                None => {
                    loaded = self.read_slab(s)?;
                    &loaded
                }
            };
            for &t in &self.layout.owned[s] {
                let (off, len) = (self.layout.place[t].1, self.spec.tensors[t].numel());
                w.tensors[t].copy_from_slice(&buf[off..off + len]);
                m.tensors[t].copy_from_slice(&buf[2 * n + off..2 * n + off + len]);
                v.tensors[t].copy_from_slice(&buf[3 * n + off..3 * n + off + len]);
            }
        }
        Ok((w, m, v))
    }
}

/// `torch.nn.utils.clip_grad_norm_`'s factor (1 when not clipping).
pub fn clip_factor(grad_norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (grad_norm + 1e-6)).min(1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws_model::Gpt2Config;

    fn spec() -> ModelSpec {
        ModelSpec::new(Gpt2Config { n_layer: 3, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 40 })
    }

    fn opt() -> OptimizerConfig {
        OptimizerConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ws-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn random_params(spec: &ModelSpec, seed: u64) -> Params {
        let mut p = Params::zeros(spec);
        let mut rng = ws_kernels::Rng::new(seed);
        for t in &mut p.tensors {
            rng.fill_uniform(t, -1.0, 1.0);
        }
        p
    }

    /// Feeds every layer's gradient once (layer order of a backward pass) and closes the step.
    fn one_step(store: &mut Store, spec: &ModelSpec, grads: &Params, lr: f64) -> f64 {
        for l in (0..spec.layer_count()).rev() {
            let flat: Vec<f32> = spec.layers[l].tensors.iter().flat_map(|&t| grads.tensors[t].clone()).collect();
            store.accumulate(l, &flat).unwrap();
        }
        store.finish_step(lr)
    }

    #[test]
    fn the_tied_embedding_lives_in_the_embedding_slab() {
        let spec = spec();
        let layout = Layout::new(&spec);
        let head = spec.layer_count() - 1;
        assert_eq!(layout.place[0].0, 0);
        assert_eq!(layout.layer_slabs[head], vec![0, head]);
        assert_eq!(layout.slab_params.iter().sum::<usize>(), spec.parameter_count());
    }

    #[test]
    fn updates_equal_resident_adamw_bit_for_bit_at_any_dram_budget() {
        let spec = spec();
        let params = random_params(&spec, 1);
        let total = 16 * spec.parameter_count() as u64;
        let min = Layout::new(&spec).min_dram_bytes();
        for budget in [total, total / 2, min] {
            let mut store =
                Store::create(&spec, &params, None, 0, &tmp(&format!("eq{budget}")), budget, opt(), 1).unwrap();
            let seq: Vec<usize> = (0..spec.layer_count()).chain((0..spec.layer_count()).rev()).collect();
            store.set_access_sequence(&seq);
            // The reference: the same AdamW kernel per tensor, resident.
            let mut p = params.clone();
            let (mut m, mut v) = (Params::zeros(&spec), Params::zeros(&spec));
            for step in 1..=3u64 {
                let grads = random_params(&spec, 10 + step);
                // The tied embedding receives two contributions: the head's then the embedding's.
                let norm = one_step(&mut store, &spec, &grads, 0.01);
                let mut g = grads.clone();
                ws_kernels::parallel::add_inplace(&mut g.tensors[0], &grads.tensors[0]);
                let want_norm = g.sum_of_squares().sqrt();
                assert_eq!(norm, want_norm);
                let scale = clip_factor(want_norm, 1.0);
                for (i, ts) in spec.tensors.iter().enumerate() {
                    let s = AdamWStep {
                        lr: 0.01,
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: if ts.decay { 0.1 } else { 0.0 },
                        t: step,
                        grad_scale: scale,
                    };
                    adamw_update(&mut p.tensors[i], &g.tensors[i], &mut m.tensors[i], &mut v.tensors[i], s);
                }
            }
            let (w2, m2, v2) = store.snapshot().unwrap();
            assert_eq!(w2, p, "weights, budget {budget}");
            assert_eq!((m2, v2), (m, v), "moments, budget {budget}");
            let st = store.stats();
            assert!(st.dram_bytes_peak <= budget, "DRAM peak {} over budget {budget}", st.dram_bytes_peak);
            if budget < total {
                assert!(st.flash_read_bytes > 0, "a partial budget must use the flash tier");
            }
        }
    }

    #[test]
    fn a_budget_below_one_layer_is_refused() {
        let spec = spec();
        let e = Store::create(&spec, &Params::zeros(&spec), None, 0, &tmp("small"), 1000, opt(), 1).err().unwrap();
        assert!(matches!(e, StoreError::BudgetTooSmall { .. }), "{e}");
    }

    #[test]
    fn a_flipped_byte_in_a_slab_file_is_detected() {
        let spec = spec();
        let dir = tmp("flip");
        let layout = Layout::new(&spec);
        let min = layout.min_dram_bytes();
        let mut store = Store::create(&spec, &random_params(&spec, 2), None, 0, &dir, min, opt(), 1).unwrap();
        let path = dir.join("slab-00002.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        let mut out = vec![0f32; layout.layer_params(&spec, 2)];
        let e = store.read_layer(2, &mut out).unwrap_err().to_string();
        assert!(e.contains("slab-00002.bin") && e.contains("layer 2") && e.contains("corrupt"), "{e}");
    }

    #[test]
    fn checkpoints_restore_exactly_and_detect_corruption() {
        let spec = spec();
        let params = random_params(&spec, 3);
        let ckpt = tmp("ckpt");
        let mut store = Store::create(&spec, &params, None, 0, &tmp("ck-store"), u64::MAX, opt(), 1).unwrap();
        one_step(&mut store, &spec, &random_params(&spec, 4), 0.01);
        let first = store.checkpoint(&ckpt, "a = 1").unwrap();
        one_step(&mut store, &spec, &random_params(&spec, 5), 0.01);
        let m = store.checkpoint(&ckpt, "a = 2").unwrap();
        assert_eq!((first.step, m.step), (1, 2));
        assert!(!ckpt.join(&first.slabs[0].file).exists(), "the older snapshot is removed once the new one is durable");
        let want = store.snapshot().unwrap();
        let (mut restored, manifest) = Store::restore(&spec, &ckpt, &tmp("ck-restored"), u64::MAX, opt(), 1).unwrap();
        assert_eq!(manifest.run_toml, "a = 2");
        assert_eq!(restored.version, 2);
        assert_eq!(restored.snapshot().unwrap(), want);

        let path = ckpt.join(&m.slabs[1].file);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[7] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = Store::restore(&spec, &ckpt, &tmp("ck-bad"), u64::MAX, opt(), 1).err().unwrap().to_string();
        assert!(e.contains(&m.slabs[1].file) && e.contains("layer 1"), "{e}");
    }
}
