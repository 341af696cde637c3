//! The parameter store (Cerebras' MemoryX): fp32 master weights, AdamW
//! moments and gradient accumulators, one slab per layer, in a DRAM tier
//! with a byte budget backed by a flash tier of slab files; the optimizer
//! runs here, where the gradients arrive.
//!
//! - A slab holds the tensors its layer owns (a tensor is owned by the first
//!   layer that lists it: the tied token embedding belongs to the embedding
//!   layer and is read from there for the head). A slab is cut into pages of
//!   at most `page_params` parameters; a page holds four regions: weights,
//!   gradient accumulator, first and second moments of its parameters.
//! - The flash tier is a file per slab, pages back to back, so a layer is
//!   one sequential read; pages are read and written with positioned I/O on
//!   4 KiB-aligned buffers. It holds every page not in DRAM: a new store
//!   keeps the pages that fit the budget in DRAM (in page order) and writes
//!   the rest; an evicted page is written back if DRAM changed it. A budget
//!   that holds the whole model never writes flash (until a checkpoint),
//!   so the disk need not be as large as the model. The DRAM tier holds
//!   regions of pages, each in a buffer of its own, and counts only those
//!   against its budget: a backward pass brings in a page's weights and
//!   gradient, not its moments. The unit of eviction is the page, so the
//!   budget need only hold one page, whatever the size of a layer. The order
//!   of accesses is known (the schedule), so eviction is Belady's: the page
//!   needed furthest in the future goes, never one the current access still
//!   needs. Every page read from flash is checked against the CRC32 of what
//!   was written. An evicted page's buffers stay in the tier (and in its
//!   budget) for the next regions read: memory is mapped and first touched
//!   once, not at every read.
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
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod scratch;
mod slab;

pub use checkpoint::{read_checkpoint_masks, read_checkpoint_weights, read_manifest, Manifest, SlabEntry, MANIFEST};
pub use slab::AlignedBuf;
pub use ws_kernels::math::sum_of_squares_f64;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use ws_kernels::adamw::{adamw_update, adamw_update_bf16, AdamWStep};
use ws_kernels::sparse::SparsePattern;
use ws_model::sparsity::{remap, Masks};
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

/// Region masks of a page: weights, gradient, first and second moments.
const WEIGHTS: u8 = 0b0001;
const GRADIENT: u8 = 0b0010;
const ALL: u8 = 0b1111;

/// Parameters per page by default: 64 MiB of slab (four fp32 regions).
pub const PAGE_PARAMS_DEFAULT: usize = 4 << 20;

/// Where each tensor lives: slab and offset (in parameters) within the slab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Parameters of each slab (the tensors its layer owns).
    pub slab_params: Vec<usize>,
    /// Per tensor: (slab, offset).
    pub place: Vec<(usize, usize)>,
    /// Per slab: the tensors it owns, in order.
    pub owned: Vec<Vec<usize>>,
    /// Per layer: the slabs its tensors live in, ascending.
    pub layer_slabs: Vec<Vec<usize>>,
    /// Per slab: page boundaries in parameters, `[0, .., slab_params]`.
    pub pages: Vec<Vec<usize>>,
}

impl Layout {
    /// `page_params` is rounded up to a multiple of 256 so that every page
    /// starts on a 4 KiB boundary of the slab file.
    pub fn new(spec: &ModelSpec, page_params: usize) -> Layout {
        let page = page_params.max(1).div_ceil(256) * 256;
        let n_layers = spec.layer_count();
        let mut place = vec![(usize::MAX, 0); spec.tensors.len()];
        let mut owned = vec![Vec::new(); n_layers];
        let mut slab_params = vec![0; n_layers];
        for (l, layer) in spec.layers.iter().enumerate() {
            for &t in &layer.tensors {
                if place[t].0 == usize::MAX {
                    place[t] = (l, slab_params[l]);
                    slab_params[l] += spec.tensors[t].len();
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
        let pages = slab_params
            .iter()
            .map(|&n| {
                let mut b: Vec<usize> = (0..n.max(1)).step_by(page).collect();
                b.push(n);
                b
            })
            .collect();
        Layout { slab_params, place, owned, layer_slabs, pages }
    }

    /// Bytes of a slab in DRAM and on flash (four fp32 regions).
    pub fn slab_bytes(&self, slab: usize) -> u64 {
        16 * self.slab_params[slab] as u64
    }

    /// The smallest DRAM budget that works: the largest page.
    pub fn min_dram_bytes(&self) -> u64 {
        self.pages.iter().flat_map(|b| b.windows(2).map(|w| 16 * (w[1] - w[0]) as u64)).max().unwrap_or(0)
    }

    /// Floats of one layer's weights as streamed (its tensors in layer order).
    pub fn layer_params(&self, spec: &ModelSpec, layer: usize) -> usize {
        spec.layer_len(layer)
    }

    /// The tensors of slab `s` that overlap its parameters `p0..p1`, as
    /// (tensor, the tensor's offset in the slab, overlap start, overlap end),
    /// in slab coordinates.
    pub fn tensors_in(
        &self,
        spec: &ModelSpec,
        s: usize,
        p0: usize,
        p1: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let lens: Vec<usize> = self.owned[s].iter().map(|&t| spec.tensors[t].len()).collect();
        self.owned[s].iter().zip(lens).filter_map(move |(&t, len)| {
            let off = self.place[t].1;
            let (lo, hi) = (off.max(p0), (off + len).min(p1));
            (lo < hi).then_some((t, off, lo, hi))
        })
    }

    /// The pages of `slab` that overlap parameters `range`, as
    /// (page, page start, overlap start, overlap end).
    fn pages_over(
        &self,
        slab: usize,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let b = &self.pages[slab];
        (0..b.len() - 1).filter_map(move |i| {
            let (lo, hi) = (range.start.max(b[i]), range.end.min(b[i + 1]));
            (lo < hi).then_some((i, b[i], lo, hi))
        })
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

/// How a store is laid out and bounded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StoreConfig {
    /// Bytes of pages the DRAM tier may hold.
    pub dram_budget: u64,
    pub page_params: usize,
    pub optimizer: OptimizerConfig,
    /// Contributions each layer sends per step (micro-batches).
    pub micro_batches: usize,
    /// Page I/O bypasses the kernel's page cache (`O_DIRECT`) where the
    /// file system allows it and a piece is 4 KiB-aligned: no copy through
    /// the cache on either side, and the DRAM budget is all the memory the
    /// tiers use (buffered, the kernel caches what free memory allows of
    /// the flash tier). Off, or where refused, the same I/O is buffered.
    pub direct_io: bool,
}

/// Fills a new page of a slab: `(p0, p1, page)`, as in [`Store::create_with`].
type PageFill<'a> = dyn FnMut(usize, usize, &mut [f32]) -> Result<()> + 'a;

/// Where a new page went: kept in DRAM, or written to flash (its regions' CRC32).
enum Placed {
    Dram([AlignedBuf; 4]),
    Flash([u32; 4]),
}

/// An update recorded at the end of a step, applied to each page before
/// its next use.
#[derive(Clone, Copy, Debug)]
struct PendingUpdate {
    lr: f32,
    t: u64,
    grad_scale: f32,
}

struct Page {
    /// Its regions in DRAM (0 weights, 1 gradient, 2 m, 3 v of the page's
    /// parameters), each a buffer of its own: a backward pass needs only the
    /// weights and the gradient, so the moments stay on flash and take no
    /// room in the tier.
    dram: [Option<AlignedBuf>; 4],
    /// Regions (bit r) whose DRAM copy differs from flash; only they are
    /// written back.
    dirty: u8,
    /// CRC32 of each region on flash as last written.
    crc: [u32; 4],
    pending: Option<PendingUpdate>,
    /// The gradient region holds nothing of the open step (AdamW has just
    /// used it, and each tensor's first contribution overwrites its range,
    /// [`Store::accumulate`]): it is neither written back nor read. Between
    /// an update and the backward pass that follows, this saves 8 of the
    /// 44 bytes per parameter a step would move when the DRAM tier is short.
    grad_unset: bool,
}

impl Page {
    /// The regions in DRAM (bit r for region r).
    fn resident(&self) -> u8 {
        (0..4).filter(|&r| self.dram[r].is_some()).fold(0, |m, r| m | 1 << r)
    }

    fn in_dram(&self) -> bool {
        self.dram.iter().any(Option::is_some)
    }

    /// Region `r`, which must be in DRAM.
    fn region(&self, r: usize) -> &AlignedBuf {
        self.dram[r].as_ref().expect("a resident region")
    }

    fn region_mut(&mut self, r: usize) -> &mut AlignedBuf {
        self.dram[r].as_mut().expect("a resident region")
    }

    /// All four regions, which must be in DRAM.
    fn regions_mut(&mut self) -> [&mut [f32]; 4] {
        let [Some(w), Some(g), Some(m), Some(v)] = &mut self.dram else { panic!("a page not wholly resident") };
        [w, g, m, v]
    }
}

/// The regions `mask` holds, in order.
fn regions_of(mask: u8) -> impl Iterator<Item = usize> {
    (0..4).filter(move |r| mask & (1 << r) != 0)
}

/// Measured use of the DRAM tier and traffic to flash, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub dram_bytes: u64,
    pub dram_bytes_peak: u64,
    pub flash_read_bytes: u64,
    pub flash_write_bytes: u64,
    /// Page reads from flash (a cold start reads each page once).
    pub flash_reads: u64,
    /// Page buffers mapped (new memory): once the tier is full, evicted
    /// pages' buffers serve the next reads and this stops growing.
    pub buffers_mapped: u64,
    /// Of the flash bytes read and written, those that went around the page
    /// cache (`StoreConfig::direct_io`).
    pub flash_direct_bytes: u64,
}

pub struct Store {
    spec: ModelSpec,
    layout: Layout,
    dir: PathBuf,
    files: Vec<SlabFile>,
    pages: Vec<Vec<Page>>,
    config: StoreConfig,
    stats: StoreStats,
    /// The step whose weights the pages hold once pending updates are applied.
    pub version: u64,
    /// Contributions still expected this step, per tensor.
    contributions_left: Vec<usize>,
    contributions_per_step: Vec<usize>,
    /// Sum of squares of each tensor's complete gradient this step.
    grad_sq: Vec<ws_kernels::math::SumSq>,
    /// The layers of one step in access order, for eviction.
    sequence: Vec<usize>,
    cursor: usize,
    /// The access in progress: its layer, and the pages it has finished with.
    current: Option<(usize, Vec<(usize, usize)>)>,
    /// Buffers of evicted pages, kept (and counted in the DRAM tier) for the
    /// next pages to read: memory touched once is not given back and faulted
    /// in again at every page read.
    spares: Vec<AlignedBuf>,
    /// Floats a buffer for a large page is given when the tier cycles (its
    /// budget is short of the model): the largest page's, so that every
    /// such buffer fits every large page. 0 when the model fits.
    cycle_floats: usize,
    /// Where the nonzeros of the sparse tensors are (their slabs hold only those).
    masks: Masks,
}

impl Store {
    /// A store holding `params` (and moments, zero unless given) as the
    /// weights of `version`, its slab files in `dir`.
    pub fn create(
        spec: &ModelSpec,
        params: &Params,
        moments: Option<(&Params, &Params)>,
        version: u64,
        dir: &Path,
        config: StoreConfig,
    ) -> Result<Store> {
        let layout = Layout::new(spec, config.page_params);
        Store::create_with(spec, version, dir, config, |s, p0, p1, page| {
            let len = p1 - p0;
            for (t, off, lo, hi) in layout.tensors_in(spec, s, p0, p1) {
                page[lo - p0..hi - p0].copy_from_slice(&params.tensors[t][lo - off..hi - off]);
                if let Some((m, v)) = moments {
                    page[2 * len + lo - p0..2 * len + hi - p0].copy_from_slice(&m.tensors[t][lo - off..hi - off]);
                    page[3 * len + lo - p0..3 * len + hi - p0].copy_from_slice(&v.tensors[t][lo - off..hi - off]);
                }
            }
            Ok(())
        })
    }

    /// A store whose pages `fill(slab, p0, p1, page)` writes, page by page
    /// in order (slabs ascending, pages ascending), so creating a model larger
    /// than memory takes one page of memory beyond the DRAM budget. The page
    /// buffer is zeroed and laid out weights | gradient | m | v, `p1 - p0`
    /// parameters each.
    pub fn create_with(
        spec: &ModelSpec,
        version: u64,
        dir: &Path,
        config: StoreConfig,
        mut fill: impl FnMut(usize, usize, usize, &mut [f32]) -> Result<()>,
    ) -> Result<Store> {
        let mut store = Store::empty(spec, version, dir, config)?;
        let keep = store.initial_residency();
        for (s, keep) in keep.iter().enumerate() {
            let placed = store.fill_slab(s, keep, &mut |p0, p1, page| fill(s, p0, p1, page))?;
            store.place(s, placed);
        }
        Ok(store)
    }

    /// [`Store::create_with`] with the slabs filled in parallel (a slab's
    /// pages in order): `slab_fill(slab)` makes the filler of one slab's
    /// pages, `(p0, p1, page)`. For a model of billions of parameters, whose
    /// initial draw would take minutes on one core.
    pub fn create_parallel<F>(
        spec: &ModelSpec,
        version: u64,
        dir: &Path,
        config: StoreConfig,
        slab_fill: impl Fn(usize) -> F + Sync,
    ) -> Result<Store>
    where
        F: FnMut(usize, usize, &mut [f32]) -> Result<()>,
    {
        use rayon::prelude::*;
        let mut store = Store::empty(spec, version, dir, config)?;
        let keep = store.initial_residency();
        let placed = {
            let store = &store;
            (0..spec.layer_count())
                .into_par_iter()
                .map(|s| store.fill_slab(s, &keep[s], &mut slab_fill(s)))
                .collect::<Result<Vec<_>>>()?
        };
        for (s, placed) in placed.into_iter().enumerate() {
            store.place(s, placed);
        }
        Ok(store)
    }

    /// A store with no pages filled yet: its slab files created empty.
    fn empty(spec: &ModelSpec, version: u64, dir: &Path, config: StoreConfig) -> Result<Store> {
        let layout = Layout::new(spec, config.page_params);
        let needed = layout.min_dram_bytes();
        if config.dram_budget < needed {
            return Err(StoreError::BudgetTooSmall { budget: config.dram_budget, needed });
        }
        std::fs::create_dir_all(dir).map_err(io("cannot create directory", dir))?;
        let mut contributions_per_step = vec![0; spec.tensors.len()];
        for layer in &spec.layers {
            for &t in &layer.tensors {
                contributions_per_step[t] += config.micro_batches;
            }
        }
        let mut files = Vec::new();
        for s in 0..spec.layer_count() {
            let path = dir.join(format!("slab-{s:05}.bin"));
            files.push(SlabFile::create(&path, config.direct_io).map_err(io("cannot open slab file", &path))?);
        }
        let pages = layout
            .pages
            .iter()
            .map(|b| {
                (0..b.len() - 1)
                    .map(|_| Page { dram: Default::default(), dirty: 0, crc: [0; 4], pending: None, grad_unset: false })
                    .collect()
            })
            .collect();
        let state_bytes: u64 = (0..layout.slab_params.len()).map(|s| layout.slab_bytes(s)).sum();
        let cycle_floats = if config.dram_budget < state_bytes { (layout.min_dram_bytes() / 16) as usize } else { 0 };
        Ok(Store {
            spec: spec.clone(),
            layout,
            dir: dir.to_path_buf(),
            files,
            pages,
            config,
            stats: StoreStats::default(),
            version,
            contributions_left: contributions_per_step.clone(),
            contributions_per_step,
            grad_sq: vec![Default::default(); spec.tensors.len()],
            sequence: Vec::new(),
            cursor: 0,
            current: None,
            spares: Vec::new(),
            cycle_floats,
            masks: Masks::dense(spec),
        })
    }

    /// Which pages a new store keeps in DRAM: in page order while the
    /// budget has room. The rest start on flash. With a budget that holds
    /// the whole model, flash is not touched until a checkpoint.
    fn initial_residency(&self) -> Vec<Vec<bool>> {
        let mut used = 0u64;
        self.layout
            .pages
            .iter()
            .map(|b| {
                b.windows(2)
                    .map(|w| {
                        let bytes = 16 * (w[1] - w[0]) as u64;
                        let keep = used + bytes <= self.config.dram_budget;
                        used += if keep { bytes } else { 0 };
                        keep
                    })
                    .collect()
            })
            .collect()
    }

    /// Fills slab `s`'s pages in order; each is kept for DRAM (`keep`) or
    /// written to flash at once, with its regions' checksums.
    fn fill_slab(&self, s: usize, keep: &[bool], fill: &mut PageFill) -> Result<Vec<Placed>> {
        let bounds = &self.layout.pages[s];
        let mut placed = Vec::with_capacity(keep.len());
        // One staging buffer for the slab's pages, mapped and touched once.
        let largest = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut page = AlignedBuf::with_capacity(4 * largest, 0);
        for (i, w) in bounds.windows(2).enumerate() {
            let (p0, p1) = (w[0], w[1]);
            let len = p1 - p0;
            page.set_len(4 * len);
            page.fill(0.0);
            fill(p0, p1, &mut page)?;
            if keep[i] {
                placed.push(Placed::Dram(std::array::from_fn(|r| {
                    let mut b = AlignedBuf::zeroed(len);
                    // Its gradient and moments are written only at the first
                    // step; their memory is touched here, where the slabs
                    // are filled in parallel, not then, when the worker waits.
                    b.populate();
                    b.copy_from_slice(&page[r * len..(r + 1) * len]);
                    b
                })));
                continue;
            }
            let mut crc = [0; 4];
            let regions: [&[u8]; 4] = std::array::from_fn(|r| &page.as_bytes()[4 * len * r..4 * len * (r + 1)]);
            self.write_span(s, p0, p1, regions, ALL, &mut crc)?;
            placed.push(Placed::Flash(crc));
        }
        Ok(placed)
    }

    /// Records where slab `s`'s new pages went.
    fn place(&mut self, s: usize, placed: Vec<Placed>) {
        for (i, p) in placed.into_iter().enumerate() {
            let (p0, p1) = self.page_range(s, i);
            let page = &mut self.pages[s][i];
            match p {
                Placed::Dram(bufs) => {
                    // Flash has never seen it: every region is dirty.
                    self.stats.dram_bytes += bufs.iter().map(|b| 4 * b.capacity() as u64).sum::<u64>();
                    self.stats.buffers_mapped += 4;
                    (page.dram, page.dirty) = (bufs.map(Some), ALL);
                    self.stats.dram_bytes_peak = self.stats.dram_bytes_peak.max(self.stats.dram_bytes);
                }
                Placed::Flash(crc) => {
                    page.crc = crc;
                    self.stats.flash_write_bytes += 16 * (p1 - p0) as u64;
                }
            }
        }
    }

    /// The patterns of the sparse tensors.
    pub fn masks(&self) -> &Masks {
        &self.masks
    }

    /// Sets the patterns of the sparse tensors, whose slabs hold values in
    /// their order (a fresh store's caller knows them; a restored store has
    /// them from its checkpoint).
    pub fn set_masks(&mut self, masks: Masks) -> std::result::Result<(), String> {
        masks.check(&self.spec)?;
        self.masks = masks;
        Ok(())
    }

    /// One prune-and-regrow update of every sparse tensor, between steps:
    /// `choose(tensor, pattern, weights)` gives the new pattern and where
    /// each of its values comes from ([`ws_model::sparsity::prune_regrow`]).
    /// Weights and both moments move with their nonzeros; regrown ones
    /// start at zero. Pending updates are applied first. Raises the masks'
    /// version.
    pub fn prune_regrow(
        &mut self,
        mut choose: impl FnMut(usize, &SparsePattern, &[f32]) -> (SparsePattern, Vec<Option<u32>>),
    ) -> Result<()> {
        assert!(self.contributions_left == self.contributions_per_step, "masks change only between steps");
        for t in 0..self.spec.tensors.len() {
            let Some(pattern) = self.masks.patterns[t].clone() else { continue };
            let state = self.tensor_state(t)?;
            let (new, from) = choose(t, &pattern, &state[0]);
            assert_eq!(new.nnz(), pattern.nnz(), "a prune-and-regrow keeps the count");
            let moved = state.map(|v| remap(&v, &from));
            let mut at = 0;
            self.tensor_regions(t, |page, r| {
                for (k, region) in [0, 2, 3].into_iter().enumerate() {
                    page[region][r.clone()].copy_from_slice(&moved[k][at..at + r.len()]);
                }
                at += r.len();
            })?;
            self.masks.patterns[t] = Some(std::sync::Arc::new(new));
        }
        self.masks.version += 1;
        Ok(())
    }

    /// Lays the store out again for `spec`, whose sparse tensors may keep
    /// fewer nonzeros (a stage of the sparsity ramp), between steps:
    /// `choose(tensor, pattern, weights, nnz)` gives the new pattern and where
    /// its values come from ([`ws_model::sparsity::shrink`]). The new slab
    /// files are written beside the old ones, a tensor at a time (one
    /// tensor's weights and moments in memory), then replace them. Raises
    /// the masks' version.
    pub fn relayout(
        &mut self,
        spec: &ModelSpec,
        mut choose: impl FnMut(usize, &SparsePattern, &[f32], usize) -> (SparsePattern, Vec<Option<u32>>),
    ) -> Result<()> {
        assert!(self.contributions_left == self.contributions_per_step, "the layout changes only between steps");
        let next_dir = self.dir.with_extension("relayout");
        let _ = std::fs::remove_dir_all(&next_dir);
        let layout = Layout::new(spec, self.config.page_params);
        let mut masks = self.masks.clone();
        // The tensor being copied: its weights, first and second moments in the new order.
        let mut cur: Option<(usize, [Vec<f32>; 3])> = None;
        let mut next = Store::create_with(spec, self.version, &next_dir, self.config, |s, p0, p1, page| {
            let len = p1 - p0;
            for (t, off, lo, hi) in layout.tensors_in(spec, s, p0, p1) {
                if cur.as_ref().is_none_or(|c| c.0 != t) {
                    let mut regions = self.tensor_state(t)?;
                    if let (Some(p), Some(nnz)) = (masks.patterns[t].clone(), spec.tensors[t].nnz) {
                        if nnz != p.nnz() {
                            let (new, from) = choose(t, &p, &regions[0], nnz);
                            assert_eq!(new.nnz(), nnz);
                            regions = regions.map(|v| remap(&v, &from));
                            masks.patterns[t] = Some(std::sync::Arc::new(new));
                        }
                    }
                    cur = Some((t, regions));
                }
                let regions = &cur.as_ref().expect("set above").1;
                for (k, region) in [0, 2, 3].into_iter().enumerate() {
                    page[region * len + lo - p0..region * len + hi - p0]
                        .copy_from_slice(&regions[k][lo - off..hi - off]);
                }
            }
            Ok(())
        })?;
        masks.version += 1;
        next.set_masks(masks).map_err(|p| StoreError::Checkpoint { path: next_dir.clone(), problem: p })?;
        next.sequence = std::mem::take(&mut self.sequence);
        let dir = self.dir.clone();
        drop(std::mem::replace(self, next));
        std::fs::remove_dir_all(&dir).map_err(io("cannot remove the old slabs", &dir))?;
        std::fs::rename(&next_dir, &dir).map_err(io("cannot move the new slabs into place", &dir))?;
        self.dir = dir;
        Ok(())
    }

    /// Tensor `t`'s weights, first and second moments, up to date.
    fn tensor_state(&mut self, t: usize) -> Result<[Vec<f32>; 3]> {
        let mut state = [Vec::new(), Vec::new(), Vec::new()];
        self.tensor_regions(t, |page, r| {
            for (k, region) in [0, 2, 3].into_iter().enumerate() {
                state[k].extend_from_slice(&page[region][r.clone()]);
            }
        })?;
        Ok(state)
    }

    /// Visits tensor `t`'s pages in order, every region resident and up to
    /// date: `f(the page's regions, the tensor's range in the page)`; the
    /// pages are then dirty.
    fn tensor_regions(&mut self, t: usize, mut f: impl FnMut([&mut [f32]; 4], std::ops::Range<usize>)) -> Result<()> {
        let (s, off) = self.layout.place[t];
        let parts: Vec<_> = self.layout.pages_over(s, off..off + self.spec.tensors[t].len()).collect();
        for (i, p0, lo, hi) in parts {
            self.page(s, i, ALL, None)?;
            f(self.pages[s][i].regions_mut(), lo - p0..hi - p0);
            self.pages[s][i].dirty = ALL;
        }
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Whether the flash tier's aligned page I/O goes around the page cache
    /// (`StoreConfig::direct_io` asked for it and the file system allows it).
    pub fn direct_io_active(&self) -> bool {
        self.files.iter().all(|f| f.direct_active())
    }

    pub fn stats(&self) -> StoreStats {
        let direct = self.files.iter().map(|f| f.direct_bytes.load(std::sync::atomic::Ordering::Relaxed)).sum();
        StoreStats { flash_direct_bytes: direct, ..self.stats }
    }

    pub fn config(&self) -> StoreConfig {
        self.config
    }

    /// The layers one step reads, in order (forward, head, backward uses:
    /// gradients added are not counted, they follow their use's read);
    /// eviction keeps what comes next.
    pub fn set_access_sequence(&mut self, layers: &[usize]) {
        self.sequence = layers.to_vec();
        self.cursor = 0;
    }

    fn slab_path(&self, s: usize) -> PathBuf {
        self.dir.join(format!("slab-{s:05}.bin"))
    }

    fn page_range(&self, s: usize, i: usize) -> (usize, usize) {
        (self.layout.pages[s][i], self.layout.pages[s][i + 1])
    }

    /// Writes back the `dirty` regions of page (s, i) (one positioned write
    /// each) and records their checksums; an unset gradient stays unwritten.
    fn write_regions(&mut self, s: usize, i: usize, dirty: u8) -> Result<()> {
        let (p0, p1) = self.page_range(s, i);
        let page = &self.pages[s][i];
        let dirty = if page.grad_unset { dirty & !GRADIENT } else { dirty };
        let regions: [&[u8]; 4] =
            std::array::from_fn(|r| page.dram[r].as_ref().map_or(&[][..], |b| &b.as_bytes()[..4 * (p1 - p0)]));
        let mut crc = page.crc;
        let written = self.write_span(s, p0, p1, regions, dirty, &mut crc)?;
        self.pages[s][i].crc = crc;
        self.stats.flash_write_bytes += written;
        Ok(())
    }

    /// Writes the regions `mask` of the page holding parameters p0..p1 of
    /// slab `s` (one positioned write each, from `regions[r]`) and sets
    /// their CRC32s in `crc`; returns the bytes written. Needs no `&mut`:
    /// new slabs are written in parallel.
    fn write_span(
        &self,
        s: usize,
        p0: usize,
        p1: usize,
        regions: [&[u8]; 4],
        mask: u8,
        crc: &mut [u32; 4],
    ) -> Result<u64> {
        let region = 4 * (p1 - p0);
        let mut written = 0;
        for r in regions_of(mask) {
            let bytes = regions[r];
            assert_eq!(bytes.len(), region, "region {r} of a page of slab {s}");
            let at = (16 * p0 + r * region) as u64;
            crc[r] = write_crc(&self.files[s], bytes, at).map_err(io("cannot write slab file", &self.slab_path(s)))?;
            written += bytes.len() as u64;
        }
        Ok(written)
    }

    /// Page (s, i) read from flash into buffers of the tier (within its
    /// budget: spares, or ones freed by evicting), without entering the
    /// tier; give the buffers back with `self.spares.extend`.
    fn read_page(&mut self, s: usize, i: usize) -> Result<[AlignedBuf; 4]> {
        let mut bufs = Vec::with_capacity(4);
        for r in 0..4 {
            match self.load_region(s, i, r) {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    self.spares.extend(bufs);
                    return Err(e);
                }
            }
        }
        self.stats.flash_reads += 1;
        Ok(bufs.try_into().unwrap_or_else(|_| unreachable!("four regions")))
    }

    /// Region `r` of page (s, i) read from flash into a buffer of the tier
    /// ([`Store::page_buffer`], [`Store::read_region`]); on failure the
    /// buffer goes back to the spares.
    fn load_region(&mut self, s: usize, i: usize, r: usize) -> Result<AlignedBuf> {
        let (p0, p1) = self.page_range(s, i);
        let mut buf = self.page_buffer(s, i, p1 - p0)?;
        match self.read_region(s, i, r, &mut buf) {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.spares.push(buf);
                Err(e)
            }
        }
    }

    /// Reads region `r` of page (s, i) from flash into `buf` (of the page's
    /// length), verified against its checksum; an unset gradient is not read
    /// (the buffer keeps what it held).
    fn read_region(&mut self, s: usize, i: usize, r: usize, buf: &mut AlignedBuf) -> Result<()> {
        let (p0, p1) = self.page_range(s, i);
        assert_eq!(buf.len(), p1 - p0);
        if r == 1 && self.pages[s][i].grad_unset {
            return Ok(());
        }
        let region = 4 * (p1 - p0);
        let bytes = &mut buf.as_bytes_mut()[..region];
        let at = (16 * p0 + r * region) as u64;
        let found = read_crc(&self.files[s], bytes, at).map_err(io("cannot read slab file", &self.slab_path(s)))?;
        let expected = self.pages[s][i].crc[r];
        if found != expected {
            return Err(StoreError::Corrupt { path: self.slab_path(s), layer: s, found, expected });
        }
        self.stats.flash_read_bytes += region as u64;
        Ok(())
    }

    /// Accesses from now until page (s, i) is needed again; pages the
    /// current access has not reached yet are needed now (0).
    fn next_use(&self, s: usize, i: usize) -> usize {
        if let Some((layer, done)) = &self.current {
            if self.layout.layer_slabs[*layer].contains(&s) && !done.contains(&(s, i)) {
                return 0;
            }
        }
        let n = self.sequence.len();
        (1..=n)
            .find(|d| self.layout.layer_slabs[self.sequence[(self.cursor + d) % n]].contains(&s))
            .unwrap_or(usize::MAX)
    }

    /// Brings regions `need` of page (s, i) into DRAM, each into a buffer
    /// of its own, evicting the pages needed furthest ahead to make room.
    fn ensure_resident(&mut self, s: usize, i: usize, need: u8) -> Result<()> {
        let missing = need & !self.pages[s][i].resident();
        if missing == 0 {
            return Ok(());
        }
        if !self.pages[s][i].in_dram() {
            self.pages[s][i].dirty = 0;
        }
        for r in regions_of(missing) {
            self.pages[s][i].dram[r] = Some(self.load_region(s, i, r)?);
        }
        self.stats.flash_reads += 1;
        Ok(())
    }

    /// A buffer for `floats` floats (a region) of page (s, i), within the
    /// budget: a spare that holds it, else new memory where the budget has room,
    /// else the spare of a page evicted for it (the one needed furthest
    /// ahead, never one the current access still needs). Spares too small
    /// for any page to come are given back only when nothing is left to
    /// evict.
    fn page_buffer(&mut self, s: usize, i: usize, floats: usize) -> Result<AlignedBuf> {
        let budget = self.config.dram_budget;
        // A large page's region gets the largest region's room when the
        // tier cycles, so its buffer serves any large page's region after it.
        let capacity = if 2 * floats > self.cycle_floats { floats.max(self.cycle_floats) } else { floats };
        loop {
            // The tightest spare that holds the page; a small page takes a
            // large spare only when the budget has no room for its own.
            let fits = |b: &AlignedBuf| b.capacity() >= floats;
            let tight = |b: &AlignedBuf| fits(b) && b.capacity() <= capacity.max(2 * floats);
            let room = self.stats.dram_bytes + 4 * capacity as u64 <= budget;
            let pick = |ok: &dyn Fn(&AlignedBuf) -> bool| {
                self.spares.iter().enumerate().filter(|(_, b)| ok(b)).min_by_key(|(_, b)| b.capacity()).map(|(k, _)| k)
            };
            if let Some(k) = pick(&tight).or_else(|| if room { None } else { pick(&fits) }) {
                let mut b = self.spares.swap_remove(k);
                b.set_len(floats);
                return Ok(b);
            }
            if room {
                self.stats.dram_bytes += 4 * capacity as u64;
                self.stats.dram_bytes_peak = self.stats.dram_bytes_peak.max(self.stats.dram_bytes);
                self.stats.buffers_mapped += 1;
                let mut b = AlignedBuf::with_capacity(capacity, floats);
                if self.cycle_floats > 0 {
                    // It will hold page after page: all its memory is touched once, now.
                    b.populate();
                }
                return Ok(b);
            }
            let victim = (0..self.pages.len())
                .flat_map(|vs| (0..self.pages[vs].len()).map(move |vi| (vs, vi)))
                .filter(|&(vs, vi)| self.pages[vs][vi].in_dram() && (vs, vi) != (s, i))
                .max_by_key(|&(vs, vi)| (self.next_use(vs, vi), vs, vi));
            match victim {
                Some((vs, vi)) => self.evict(vs, vi)?,
                None => {
                    let b = self.spares.pop().expect("the budget holds the largest page (checked at creation)");
                    self.stats.dram_bytes -= 4 * b.capacity() as u64;
                }
            }
        }
    }

    /// Drops page (s, i) from DRAM, writing its dirty regions behind; its
    /// buffers become spares (still counted in the tier).
    fn evict(&mut self, s: usize, i: usize) -> Result<()> {
        let dirty = self.pages[s][i].dirty;
        assert_eq!(dirty & !self.pages[s][i].resident(), 0, "only regions in DRAM can be dirty");
        if dirty != 0 {
            self.write_regions(s, i, dirty)?;
            self.pages[s][i].dirty = 0;
        }
        self.spares.extend(self.pages[s][i].dram.iter_mut().filter_map(Option::take));
        Ok(())
    }

    /// Makes regions `need` of page (s, i) resident and up to date (a
    /// pending update needs all four). With `emit` (a range of the page's
    /// parameters within one tensor, and room for it), a pending update
    /// also writes that range's new weights in bf16 there; returns whether
    /// it did.
    fn page(
        &mut self,
        s: usize,
        i: usize,
        need: u8,
        emit: Option<(std::ops::Range<usize>, &mut [u16])>,
    ) -> Result<bool> {
        let need = if self.pages[s][i].pending.is_some() { ALL } else { need };
        self.ensure_resident(s, i, need)?;
        let Some(p) = self.pages[s][i].pending.take() else { return Ok(false) };
        let (p0, p1) = self.page_range(s, i);
        let len = p1 - p0;
        let opt = self.config.optimizer;
        let [w, g, m, v] = self.pages[s][i].regions_mut();
        debug_assert_eq!(w.len(), len);
        let (e, mut out) = match emit {
            Some((e, out)) => (e, Some(out)),
            None => (0..0, None),
        };
        for (t, _, lo, hi) in self.layout.tensors_in(&self.spec, s, p0, p1) {
            let step = AdamWStep {
                lr: p.lr,
                beta1: opt.beta1,
                beta2: opt.beta2,
                eps: opt.eps,
                weight_decay: if self.spec.tensors[t].decay { opt.weight_decay } else { 0.0 },
                t: p.t,
                grad_scale: p.grad_scale,
            };
            let r = lo - p0..hi - p0;
            // The emitted range lies in one tensor: split that tensor's range around it.
            let (a, b) =
                if e.start >= r.start && e.end <= r.end && !e.is_empty() { (e.start, e.end) } else { (r.end, r.end) };
            for part in [r.start..a, b..r.end] {
                adamw_update(&mut w[part.clone()], &g[part.clone()], &mut m[part.clone()], &mut v[part.clone()], step);
            }
            if a < b {
                let out = out.take().expect("one tensor holds the emitted range");
                adamw_update_bf16(&mut w[a..b], &g[a..b], &mut m[a..b], &mut v[a..b], step, out);
            }
        }
        assert!(out.is_none() || e.is_empty(), "the emitted range {e:?} is not within one tensor of page ({s}, {i})");
        // The gradient was used: the next step's contributions overwrite it.
        self.pages[s][i].dirty = ALL;
        self.pages[s][i].grad_unset = true;
        Ok(!e.is_empty())
    }

    /// Visits layer `layer`'s tensors page by page in layer order:
    /// `f(store, tensor, slab, page, page length, overlap in page
    /// coordinates, offset of the overlap within the layer's concatenated
    /// tensors)`; or with `bf16`, writes the layer's weights there in bf16
    /// (a pending update writes them as it goes) and calls no `f`.
    fn for_layer_pages(
        &mut self,
        layer: usize,
        need: u8,
        mut bf16: Option<&mut [u16]>,
        mut f: impl FnMut(&mut Store, usize, usize, usize, usize, std::ops::Range<usize>, usize),
    ) -> Result<()> {
        self.current = Some((layer, Vec::new()));
        let mut o = 0;
        for &t in &self.spec.layers[layer].tensors.clone() {
            let (s, off) = self.layout.place[t];
            let len = self.spec.tensors[t].len();
            let parts: Vec<_> = self.layout.pages_over(s, off..off + len).collect();
            for (i, p0, lo, hi) in parts {
                let page_len = self.layout.pages[s][i + 1] - p0;
                let (r, at) = (lo - p0..hi - p0, o + lo - off);
                let emit = bf16.as_deref_mut().map(|b| (r.clone(), &mut b[at..at + r.len()]));
                if !self.page(s, i, need, emit)? {
                    match bf16.as_deref_mut() {
                        Some(b) => {
                            let w = &self.pages[s][i].region(0)[r.clone()];
                            ws_kernels::bf16::to_bf16_into(&mut b[at..at + r.len()], w);
                        }
                        None => f(self, t, s, i, page_len, r, at),
                    }
                }
                if let Some((_, done)) = &mut self.current {
                    done.push((s, i));
                }
            }
            o += len;
        }
        self.current = None;
        Ok(())
    }

    /// One read of the access sequence done (gradients added to a layer
    /// are not in the sequence: they follow the read of the same use).
    fn advance(&mut self) {
        if !self.sequence.is_empty() {
            self.cursor = (self.cursor + 1) % self.sequence.len();
        }
    }

    /// Copies the weights of `layer` (its tensors in layer order) into `out`.
    pub fn read_layer(&mut self, layer: usize, out: &mut [f32]) -> Result<()> {
        assert_eq!(out.len(), self.layout.layer_params(&self.spec, layer), "layer {layer}: wrong buffer size");
        self.for_layer_pages(layer, WEIGHTS, None, |st, _t, s, i, _len, r, o| {
            let w = &st.pages[s][i].region(0)[r.clone()];
            ws_kernels::parallel::copy(&mut out[o..o + r.len()], w);
        })?;
        self.advance();
        Ok(())
    }

    /// The weights of `layer` rounded to bf16 (as [`ws_kernels::bf16::to_bf16`]),
    /// straight from the pages, or from the pending update as it writes them.
    pub fn read_layer_bf16(&mut self, layer: usize, out: &mut [u16]) -> Result<()> {
        assert_eq!(out.len(), self.layout.layer_params(&self.spec, layer), "layer {layer}: wrong buffer size");
        self.for_layer_pages(layer, WEIGHTS, Some(out), |_, _, _, _, _, _, _| unreachable!("bf16 reads call no f"))?;
        self.advance();
        Ok(())
    }

    /// Adds one contribution to the gradients of `layer` (its tensors in
    /// layer order, as the worker computed them). A tensor's first
    /// contribution of the step overwrites its gradient (nothing is read:
    /// the last step's is stale); its last also takes its sum of squares,
    /// element by piece by piece as [`ws_kernels::math::SumSq`] defines it.
    pub fn accumulate(&mut self, layer: usize, grads: &[f32]) -> Result<()> {
        assert_eq!(grads.len(), self.layout.layer_params(&self.spec, layer), "layer {layer}: wrong gradient size");
        let tensors = self.spec.layers[layer].tensors.clone();
        let mut first = vec![false; self.spec.tensors.len()];
        for &t in &tensors {
            assert!(self.contributions_left[t] > 0, "more contributions to tensor {t} than the schedule sends");
            first[t] = self.contributions_left[t] == self.contributions_per_step[t];
            self.contributions_left[t] -= 1;
            if self.contributions_left[t] == 0 {
                self.grad_sq[t] = Default::default();
            }
        }
        self.for_layer_pages(layer, GRADIENT, None, |st, t, s, i, _len, r, o| {
            let g = &mut st.pages[s][i].region_mut(1)[r.clone()];
            let x = &grads[o..o + r.len()];
            match (first[t], st.contributions_left[t] == 0) {
                (true, true) => st.grad_sq[t].copy_and_feed(g, x),
                (false, true) => st.grad_sq[t].add_and_feed(g, x),
                (true, false) => ws_kernels::parallel::copy(g, x),
                (false, false) => ws_kernels::parallel::add_inplace(g, x),
            }
            st.pages[s][i].dirty |= GRADIENT;
            st.pages[s][i].grad_unset = false;
        })
    }

    /// Closes the step: global norm from the complete gradients, clip
    /// factor, and a pending AdamW update (step `t` = version + 1) on every
    /// page. Returns the gradient norm before clipping.
    pub fn finish_step(&mut self, lr: f64) -> f64 {
        assert!(self.contributions_left.iter().all(|&c| c == 0), "a step closed before every contribution arrived");
        let norm = self.grad_sq.iter().fold(0.0, |a, s| a + s.value()).sqrt();
        let grad_scale = clip_factor(norm, self.config.optimizer.grad_clip);
        self.version += 1;
        let update = PendingUpdate { lr: lr as f32, t: self.version, grad_scale };
        for p in self.pages.iter_mut().flatten() {
            assert!(p.pending.is_none(), "a page skipped its previous update");
            p.pending = Some(update);
        }
        self.contributions_left.clone_from(&self.contributions_per_step);
        norm
    }

    /// Drops the open step's gradient contributions, for a step that can
    /// no longer complete (a worker was lost): every tensor that received
    /// any gets its gradient zeroed, and the step's counts start over.
    /// Weights, moments and the version are untouched, so the step can be
    /// run again from the same state.
    pub fn abandon_step(&mut self) -> Result<()> {
        let touched: Vec<usize> = (0..self.spec.layers.len())
            .filter(|&l| {
                self.spec.layers[l].tensors.iter().any(|&t| self.contributions_left[t] < self.contributions_per_step[t])
            })
            .collect();
        for layer in touched {
            self.for_layer_pages(layer, GRADIENT, None, |st, _t, s, i, _len, r, _o| {
                st.pages[s][i].region_mut(1)[r].fill(0.0);
                st.pages[s][i].dirty |= GRADIENT;
            })?;
        }
        self.contributions_left.clone_from(&self.contributions_per_step);
        self.grad_sq = vec![Default::default(); self.spec.tensors.len()];
        self.cursor = 0;
        Ok(())
    }

    /// Sets the gradient contributions each tensor receives per step (per
    /// use in a micro-batch: when the number of workers changes, so does
    /// each one's count of micro-batches). Only between steps.
    pub fn set_micro_batches(&mut self, micro_batches: usize) {
        assert!(micro_batches >= 1);
        assert!(
            self.contributions_left == self.contributions_per_step,
            "the contributions per step change only between steps"
        );
        for (t, c) in self.contributions_per_step.iter_mut().enumerate() {
            *c = *c / self.config.micro_batches * micro_batches;
            self.contributions_left[t] = *c;
        }
        self.config.micro_batches = micro_batches;
    }

    /// Applies every pending update (before a checkpoint or an export).
    pub fn flush(&mut self) -> Result<()> {
        for s in 0..self.pages.len() {
            for i in 0..self.pages[s].len() {
                if self.pages[s][i].pending.is_some() {
                    self.page(s, i, ALL, None)?;
                }
            }
        }
        Ok(())
    }

    /// Calls `f(slab, page, its four regions)` for every page in order,
    /// after applying pending updates; pages not in DRAM are read from
    /// flash without entering the tier.
    fn for_each_page(&mut self, mut f: impl FnMut(usize, usize, [&AlignedBuf; 4]) -> Result<()>) -> Result<()> {
        self.flush()?;
        for s in 0..self.pages.len() {
            for i in 0..self.pages[s].len() {
                if self.pages[s][i].in_dram() {
                    self.ensure_resident(s, i, ALL)?;
                    let page = &self.pages[s][i];
                    f(s, i, std::array::from_fn(|r| page.region(r)))?;
                } else {
                    let bufs = self.read_page(s, i)?;
                    let r = f(s, i, std::array::from_fn(|r| &bufs[r]));
                    self.spares.extend(bufs);
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Weights and moments of every tensor; for export and tests.
    pub fn snapshot(&mut self) -> Result<(Params, Params, Params)> {
        let (mut w, mut m, mut v) = (Params::zeros(&self.spec), Params::zeros(&self.spec), Params::zeros(&self.spec));
        let layout = self.layout.clone();
        let spec = self.spec.clone();
        self.for_each_page(|s, i, regions| {
            let (p0, p1) = (layout.pages[s][i], layout.pages[s][i + 1]);
            for (t, off, lo, hi) in layout.tensors_in(&spec, s, p0, p1) {
                w.tensors[t][lo - off..hi - off].copy_from_slice(&regions[0][lo - p0..hi - p0]);
                m.tensors[t][lo - off..hi - off].copy_from_slice(&regions[2][lo - p0..hi - p0]);
                v.tensors[t][lo - off..hi - off].copy_from_slice(&regions[3][lo - p0..hi - p0]);
            }
            Ok(())
        })?;
        Ok((w, m, v))
    }
}

/// A slab's file, opened twice: buffered, and where asked and the file
/// system allows it, with `O_DIRECT` for the pieces that are aligned to
/// [`direct_align`] in memory, in the file and in length (every piece of a
/// page but the short last page's). The two never share an aligned block of
/// the file: a region starts its pieces on its own offset, and only a
/// region that starts aligned has aligned pieces. A file system that takes
/// the `O_DIRECT` open but refuses the I/O (`EINVAL`) gets buffered I/O from
/// then on.
struct SlabFile {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    direct_on: std::sync::atomic::AtomicBool,
    direct_bytes: std::sync::atomic::AtomicU64,
}

/// The alignment `O_DIRECT` needs here (address, offset, length): the
/// memory page (4 KiB, or 64 KiB on some ARM kernels), which covers the
/// logical block size of any device and keeps direct and buffered pieces
/// off each other's page-cache pages.
fn direct_align() -> usize {
    static ALIGN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf only reads a system constant.
    *ALIGN.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0).max(4096))
}

impl SlabFile {
    /// Creates (truncates) the file at `path`.
    fn create(path: &Path, direct_io: bool) -> std::io::Result<SlabFile> {
        let file = std::fs::OpenOptions::new().create(true).read(true).write(true).truncate(true).open(path)?;
        let direct = if direct_io { Self::open_direct(path) } else { None };
        Ok(SlabFile { file, direct_on: direct.is_some().into(), direct, direct_bytes: 0.into() })
    }

    /// The same file with `O_DIRECT`, or `None` where the file system
    /// refuses it (tmpfs, some overlays).
    fn open_direct(path: &Path) -> Option<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).ok()
    }

    /// Whether page I/O goes around the page cache (where aligned).
    fn direct_active(&self) -> bool {
        self.direct.is_some() && self.direct_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `O_DIRECT` handle for a piece of `len` bytes at `ptr` and file
    /// offset `at`, if it may take it.
    fn direct_for(&self, ptr: *const u8, len: usize, at: u64) -> Option<&std::fs::File> {
        let a = direct_align();
        let aligned = (ptr as usize).is_multiple_of(a) && len.is_multiple_of(a) && at.is_multiple_of(a as u64);
        self.direct.as_ref().filter(|_| aligned && self.direct_active())
    }

    /// Runs `io` on the direct handle where the piece allows it (counting
    /// its bytes), else, or where the file system refuses it, buffered.
    fn piece(
        &self,
        (ptr, len, at): (*const u8, usize, u64),
        mut io: impl FnMut(&std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        if let Some(d) = self.direct_for(ptr, len, at) {
            match io(d) {
                Ok(()) => {
                    self.direct_bytes.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_on.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        io(&self.file)
    }
}

/// Bytes of one positioned read or write when a region is split over the
/// store's threads: copies through the page cache run on every core, not
/// one (a region is up to a quarter of a 64 MiB page), and direct requests
/// keep the device busy from several threads.
const IO_CHUNK: usize = 2 << 20;

/// Reads `buf` from `file` at `at`, in chunks over the pool; returns the CRC32
/// of the bytes (the chunks' checksums combined in order).
fn read_crc(file: &SlabFile, buf: &mut [u8], at: u64) -> std::io::Result<u32> {
    use rayon::prelude::*;
    let parts = buf
        .par_chunks_mut(IO_CHUNK)
        .enumerate()
        .map(|(k, c)| {
            let at = at + (k * IO_CHUNK) as u64;
            let piece = (c.as_ptr(), c.len(), at);
            file.piece(piece, |f| f.read_exact_at(c, at))?;
            Ok(hasher_of(c))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(crc_of(parts))
}

/// Writes `buf` to `file` at `at`, in chunks over the pool; returns its CRC32.
fn write_crc(file: &SlabFile, buf: &[u8], at: u64) -> std::io::Result<u32> {
    use rayon::prelude::*;
    let parts = buf
        .par_chunks(IO_CHUNK)
        .enumerate()
        .map(|(k, c)| {
            let at = at + (k * IO_CHUNK) as u64;
            file.piece((c.as_ptr(), c.len(), at), |f| f.write_all_at(c, at))?;
            Ok(hasher_of(c))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(crc_of(parts))
}

/// A CRC32 hasher that has taken `bytes`.
fn hasher_of(bytes: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h
}

/// The CRC32 of consecutive pieces from their hashers, in order.
fn crc_of(parts: Vec<crc32fast::Hasher>) -> u32 {
    let mut all = crc32fast::Hasher::new();
    for p in &parts {
        all.combine(p);
    }
    all.finalize()
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

    /// Pages of 256 parameters: the test tensors span several.
    fn cfg(dram_budget: u64) -> StoreConfig {
        StoreConfig { dram_budget, page_params: 256, optimizer: opt(), micro_batches: 1, direct_io: true }
    }

    fn tmp(name: &str) -> PathBuf {
        crate::scratch::dir(&format!("store-{name}"))
    }

    fn random_params(spec: &ModelSpec, seed: u64) -> Params {
        let mut p = Params::zeros(spec);
        let mut rng = ws_kernels::Rng::new(seed);
        for t in &mut p.tensors {
            rng.fill_uniform(t, -1.0, 1.0);
        }
        p
    }

    #[test]
    fn an_abandoned_step_leaves_weights_moments_and_the_next_step_as_if_it_never_happened() {
        let spec = spec();
        let (g1, g2) = (random_params(&spec, 5), random_params(&spec, 6));
        let total = 16 * spec.parameter_count() as u64;
        let min = Layout::new(&spec, 256).min_dram_bytes();
        for budget in [total, min] {
            let run = |abandon: bool| {
                let dir = tmp(&format!("abandon-{abandon}-{budget}"));
                let mut store = Store::create(&spec, &random_params(&spec, 1), None, 0, &dir, cfg(budget)).unwrap();
                let n1 = one_step(&mut store, &spec, &g1, 0.01);
                if abandon {
                    // Half a step's contributions (over pages with the last
                    // step's update still pending), then the step is dropped.
                    for l in (spec.layer_count() / 2..spec.layer_count()).rev() {
                        let flat: Vec<f32> =
                            spec.layers[l].tensors.iter().flat_map(|&t| g2.tensors[t].clone()).collect();
                        store.accumulate(l, &flat).unwrap();
                    }
                    store.abandon_step().unwrap();
                }
                let n2 = one_step(&mut store, &spec, &g2, 0.01);
                let state = store.snapshot().unwrap();
                let _ = std::fs::remove_dir_all(&dir);
                ((n1, n2), state)
            };
            let (norms_a, a) = run(true);
            let (norms_b, b) = run(false);
            assert_eq!(norms_a, norms_b, "DRAM {budget}");
            assert!(a == b, "an abandoned step left a trace (DRAM {budget})");
        }
    }

    /// Feeds every layer's gradient once (layer order of a backward pass) and closes the step.
    fn one_step(store: &mut Store, spec: &ModelSpec, grads: &Params, lr: f64) -> f64 {
        for l in (0..spec.layer_count()).rev() {
            let flat: Vec<f32> = spec.layers[l].tensors.iter().flat_map(|&t| grads.tensors[t].clone()).collect();
            store.accumulate(l, &flat).unwrap();
        }
        store.finish_step(lr)
    }

    /// The eviction policy's place in the access sequence moves with the
    /// reads only: a step's gradients, added after the reads of their uses,
    /// must not shift it, or every later step evicts by the wrong distances.
    #[test]
    fn the_access_cursor_counts_reads_not_gradients() {
        let spec = spec();
        let params = random_params(&spec, 1);
        let budget = Layout::new(&spec, 256).min_dram_bytes();
        let mut store = Store::create(&spec, &params, None, 0, &tmp("cursor"), cfg(budget)).unwrap();
        let (layers, head) = (spec.layer_count(), spec.layer_count() - 1);
        let seq: Vec<usize> = (0..layers).chain((0..head).rev()).collect();
        store.set_access_sequence(&seq);
        let grads = random_params(&spec, 2);
        for step in 0..2 {
            for (j, &l) in seq.iter().enumerate() {
                assert_eq!(store.cursor, j, "step {step}: before the read of use {j}");
                let mut w = vec![0f32; store.layout().layer_params(&spec, l)];
                store.read_layer(l, &mut w).unwrap();
                if j >= head {
                    let flat: Vec<f32> =
                        spec.layers[l].tensors.iter().flat_map(|&t| grads.tensors[t].clone()).collect();
                    store.accumulate(l, &flat).unwrap();
                }
            }
            assert_eq!(store.cursor, 0, "a whole step brings the cursor round");
            store.finish_step(0.01);
        }
        let _ = std::fs::remove_dir_all(tmp("cursor"));
    }

    #[test]
    fn chunked_reads_and_writes_checksum_as_one_piece() {
        let dir = tmp("chunks");
        std::fs::create_dir_all(&dir).unwrap();
        for direct_io in [false, true] {
            let path = dir.join(format!("f-{direct_io}.bin"));
            let f = SlabFile::create(&path, direct_io).unwrap();
            // Lengths in floats of page-aligned buffers: whole 4 KiB blocks
            // and chunks (direct where the file system allows it), and ragged
            // ones (buffered).
            for len in [0, 1, 1024, IO_CHUNK / 4 - 1, IO_CHUNK / 4, 3 * IO_CHUNK / 4 + 1024, 3 * IO_CHUNK / 4 + 5] {
                let mut data = AlignedBuf::zeroed(len);
                for (i, x) in data.iter_mut().enumerate() {
                    *x = (i * 7 % 251) as f32;
                }
                let bytes = &data.as_bytes()[..4 * len];
                for at in [4096u64, 8192 + 12] {
                    let crc = write_crc(&f, bytes, at).unwrap();
                    assert_eq!(crc, crc32fast::hash(bytes), "{len} floats written at {at}");
                    let mut back = AlignedBuf::zeroed(len);
                    assert_eq!(
                        read_crc(&f, &mut back.as_bytes_mut()[..4 * len], at).unwrap(),
                        crc,
                        "{len} floats at {at}"
                    );
                    assert!(&back.as_bytes()[..4 * len] == bytes);
                    // The buffered handle sees what went around the cache.
                    let mut plain = vec![0u8; 4 * len];
                    f.file.read_exact_at(&mut plain, at).unwrap();
                    assert!(plain == bytes, "{len} floats at {at}, read buffered");
                }
            }
            let direct = f.direct_bytes.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(direct > 0, direct_io && f.direct.is_some(), "direct bytes {direct}");
            eprintln!("direct_io {direct_io}: O_DIRECT here: {}, {direct} bytes", f.direct.is_some());
            let mut past_the_end = vec![0u8; 8];
            assert!(read_crc(&f, &mut past_the_end, 1 << 30).is_err(), "a short read is an error");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refused_direct_piece_falls_back_to_buffered_for_good() {
        use std::os::fd::AsRawFd;
        let dir = tmp("einval");
        std::fs::create_dir_all(&dir).unwrap();
        let f = SlabFile::create(&dir.join("f.bin"), true).unwrap();
        let Some(direct) = f.direct.as_ref().map(|d| d.as_raw_fd()) else {
            eprintln!("no O_DIRECT on this file system: nothing to fall back from");
            return;
        };
        let buffered = f.file.as_raw_fd();
        let buf = AlignedBuf::zeroed(direct_align() / 4);
        let piece = (buf.as_bytes().as_ptr(), direct_align(), 0);
        let mut seen = Vec::new();
        // A file system that took the O_DIRECT open but refuses the I/O.
        let refuse = |h: &std::fs::File, seen: &mut Vec<i32>| {
            seen.push(h.as_raw_fd());
            if h.as_raw_fd() == direct {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(())
            }
        };
        f.piece(piece, |h| refuse(h, &mut seen)).unwrap();
        assert_eq!(seen, vec![direct, buffered], "tried direct, then buffered");
        assert!(!f.direct_active());
        seen.clear();
        f.piece(piece, |h| refuse(h, &mut seen)).unwrap();
        assert_eq!(seen, vec![buffered], "buffered from then on");
        assert_eq!(f.direct_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Any other error is the caller's.
        let g = SlabFile::create(&dir.join("g.bin"), true).unwrap();
        let e = g.piece(piece, |_| Err(std::io::Error::from_raw_os_error(libc::EIO))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(g.direct_active(), "an I/O error does not turn direct I/O off");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tied_embedding_lives_in_the_embedding_slab() {
        let spec = spec();
        let layout = Layout::new(&spec, 256);
        let head = spec.layer_count() - 1;
        assert_eq!(layout.place[0].0, 0);
        assert_eq!(layout.layer_slabs[head], vec![0, head]);
        assert_eq!(layout.slab_params.iter().sum::<usize>(), spec.parameter_count());
    }

    #[test]
    fn updates_equal_resident_adamw_bit_for_bit_at_any_dram_budget() {
        // Pages of 256 parameters (regions of 1 KiB: buffered I/O), and of
        // 1024 on a wider model (whole 4 KiB regions: around the page cache
        // where the file system allows it).
        let wide = ModelSpec::new(Gpt2Config { n_layer: 2, n_head: 2, n_embd: 64, block_size: 8, vocab_size: 40 });
        for (spec, page) in [(spec(), 256), (wide, 1024)] {
            updates_equal_resident_adamw_at(&spec, page);
        }
    }

    fn updates_equal_resident_adamw_at(spec: &ModelSpec, page: usize) {
        let spec = spec.clone();
        let params = random_params(&spec, 1);
        let total = 16 * spec.parameter_count() as u64;
        let min = Layout::new(&spec, page).min_dram_bytes();
        let probe = tmp(&format!("probe{page}"));
        std::fs::create_dir_all(&probe).unwrap();
        let direct_here = SlabFile::create(&probe.join("f"), true).unwrap().direct.is_some();
        for budget in [total, total / 2, min] {
            let dir = tmp(&format!("eq{page}-{budget}"));
            let c = StoreConfig { page_params: page, ..cfg(budget) };
            let mut store = Store::create(&spec, &params, None, 0, &dir, c).unwrap();
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
                assert_eq!(norm, want_norm, "budget {budget} step {step}");
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
                    ws_kernels::adamw::adamw_update(
                        &mut p.tensors[i],
                        &g.tensors[i],
                        &mut m.tensors[i],
                        &mut v.tensors[i],
                        s,
                    );
                }
            }
            let (w2, m2, v2) = store.snapshot().unwrap();
            assert_eq!(w2, p, "weights, budget {budget}");
            assert_eq!((m2, v2), (m, v), "moments, budget {budget}");
            let st = store.stats();
            assert!(st.dram_bytes_peak <= budget, "DRAM peak {} over budget {budget}", st.dram_bytes_peak);
            if budget < total {
                assert!(st.flash_read_bytes > 0, "a partial budget must use the flash tier");
                let want_direct = direct_here && page.is_multiple_of(1024);
                assert_eq!(st.flash_direct_bytes > 0, want_direct, "pages of {page}, O_DIRECT here: {direct_here}");
            }
        }
    }

    #[test]
    fn an_unset_gradient_is_neither_written_back_nor_read() {
        // Whole steps as a worker drives them (forward reads, backward reads
        // then gradients) with the DRAM tier holding one layer: each page
        // leaves DRAM between its uses. Per parameter and step, the forward
        // reads all four regions (16 bytes) and writes back weights and
        // moments (12, the gradient just used stays unwritten); the
        // backward reads the weights (4, the unset gradient is not read)
        // and writes the gradient (4).
        let spec = spec();
        let params = random_params(&spec, 1);
        let min = Layout::new(&spec, 256).min_dram_bytes();
        let mut store = Store::create(&spec, &params, None, 0, &tmp("zero-grad"), cfg(min)).unwrap();
        let n = spec.layer_count();
        let seq: Vec<usize> = (0..n).chain((0..n).rev()).collect();
        store.set_access_sequence(&seq);
        let step = |store: &mut Store, seed: u64| {
            let grads = random_params(&spec, seed);
            for l in 0..n {
                let mut w = vec![0f32; store.layout().layer_params(&spec, l)];
                store.read_layer(l, &mut w).unwrap();
            }
            for l in (0..n).rev() {
                let mut w = vec![0f32; store.layout().layer_params(&spec, l)];
                store.read_layer(l, &mut w).unwrap();
                let flat: Vec<f32> = spec.layers[l].tensors.iter().flat_map(|&t| grads.tensors[t].clone()).collect();
                store.accumulate(l, &flat).unwrap();
            }
            store.finish_step(0.01);
        };
        step(&mut store, 2);
        step(&mut store, 3);
        let before = store.stats();
        step(&mut store, 4);
        let after = store.stats();
        let params_bytes = spec.parameter_count() as u64;
        let (read, written) =
            (after.flash_read_bytes - before.flash_read_bytes, after.flash_write_bytes - before.flash_write_bytes);
        let per = |b: u64| b as f64 / params_bytes as f64;
        eprintln!("per parameter and step: read {:.2}, written {:.2} bytes", per(read), per(written));
        // The embedding slab serves two layers a pass (the embedding and the
        // tied head), so its pages may move once more each way. Before zero
        // gradients stayed in DRAM: 24.9 read and 20.3 written here.
        let twice = 16 * store.layout().slab_params[0] as u64;
        assert!(read <= 20 * params_bytes + twice, "read {read} bytes, over 20 per parameter");
        assert!(written <= 16 * params_bytes + twice, "wrote {written} bytes, over 16 per parameter");
        let _ = std::fs::remove_dir_all(tmp("zero-grad"));
    }

    /// bf16 reads take the weights from the update as it writes them where
    /// one is pending (a read's first page of a tensor, split around it when
    /// the page holds others), else convert them: either way they must be
    /// the fp32 read rounded, and the stores must stay equal.
    #[test]
    fn bf16_reads_equal_fp32_reads_rounded_with_or_without_a_pending_update() {
        let spec = spec();
        let params = random_params(&spec, 1);
        let total = 16 * spec.parameter_count() as u64;
        for (page, budget) in [(256, total), (100, total), (256, Layout::new(&spec, 256).min_dram_bytes())] {
            let c = StoreConfig { page_params: page, ..cfg(budget) };
            let mut a = Store::create(&spec, &params, None, 0, &tmp(&format!("bf16-a{page}-{budget}")), c).unwrap();
            let mut b = Store::create(&spec, &params, None, 0, &tmp(&format!("bf16-b{page}-{budget}")), c).unwrap();
            let n = spec.layer_count();
            // Forward reads of every layer, then backward reads and gradients.
            let uses: Vec<(usize, bool)> = (0..n).map(|l| (l, false)).chain((0..n).rev().map(|l| (l, true))).collect();
            for step in 0..3 {
                let grads = random_params(&spec, 20 + step);
                for &(l, backward) in &uses {
                    let len = a.layout().layer_params(&spec, l);
                    let mut got = vec![0u16; len];
                    a.read_layer_bf16(l, &mut got).unwrap();
                    let mut w = vec![0f32; len];
                    b.read_layer(l, &mut w).unwrap();
                    let mut want = vec![0u16; len];
                    ws_kernels::bf16::to_bf16_into(&mut want, &w);
                    assert!(got == want, "page {page} budget {budget} step {step} layer {l}");
                    if backward {
                        let flat: Vec<f32> =
                            spec.layers[l].tensors.iter().flat_map(|&t| grads.tensors[t].clone()).collect();
                        a.accumulate(l, &flat).unwrap();
                        b.accumulate(l, &flat).unwrap();
                    }
                }
                assert_eq!(a.finish_step(0.01), b.finish_step(0.01));
            }
            assert!(a.snapshot().unwrap() == b.snapshot().unwrap());
            let _ = std::fs::remove_dir_all(tmp(&format!("bf16-a{page}-{budget}")));
            let _ = std::fs::remove_dir_all(tmp(&format!("bf16-b{page}-{budget}")));
        }
    }

    #[test]
    fn a_read_for_the_weights_alone_brings_in_and_counts_only_the_weights() {
        // A tier of two pages' room. A page read for its weights (no update
        // pending) takes a quarter of a page's room: its gradient and
        // moments stay on flash, so four times as many such pages fit.
        let spec = spec();
        let params = random_params(&spec, 1);
        let min = Layout::new(&spec, 256).min_dram_bytes();
        let dir = tmp("weights-alone");
        let mut store = Store::create(&spec, &params, None, 0, &dir, cfg(2 * min)).unwrap();
        let layer = spec.layer_count() - 2;
        let s = store.layout().layer_slabs[layer][0];
        assert!(store.pages[s].iter().all(|p| !p.in_dram()), "the last block starts on flash");
        let mut w = vec![0f32; store.layout().layer_params(&spec, layer)];
        store.read_layer(layer, &mut w).unwrap();
        let expected: Vec<f32> = spec.layers[layer].tensors.iter().flat_map(|&t| params.tensors[t].clone()).collect();
        assert_eq!(w, expected);
        let held: Vec<u8> = store.pages[s].iter().filter(|p| p.in_dram()).map(Page::resident).collect();
        assert!(held.iter().all(|&r| r == WEIGHTS), "regions held: {held:?}");
        assert!(held.len() > 2, "{} pages' weights held in two pages' room", held.len());
        let st = store.stats();
        assert!(st.dram_bytes <= 2 * min && st.dram_bytes_peak <= 2 * min, "{st:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_short_tier_reuses_evicted_buffers_instead_of_mapping_new_ones() {
        // Slabs of 13 or 14 pages of 256 parameters, the last one shorter,
        // and a tier of a few pages: every step moves pages in and out. Once
        // the tier is full, the buffers of evicted pages serve the reads
        // that follow (a large page takes the largest page's room), so no
        // new memory is mapped and faulted in at each read.
        let spec = spec();
        let params = random_params(&spec, 1);
        let min = Layout::new(&spec, 256).min_dram_bytes();
        let budget = 5 * min + min / 2;
        let dir = tmp("reuse");
        let mut store = Store::create(&spec, &params, None, 0, &dir, cfg(budget)).unwrap();
        let n = spec.layer_count();
        let seq: Vec<usize> = (0..n).chain((0..n).rev()).collect();
        store.set_access_sequence(&seq);
        let step = |store: &mut Store, seed: u64| {
            let grads = random_params(&spec, seed);
            for l in (0..n).chain((0..n).rev()) {
                let mut w = vec![0f32; store.layout().layer_params(&spec, l)];
                store.read_layer(l, &mut w).unwrap();
            }
            one_step(store, &spec, &grads, 0.01);
        };
        step(&mut store, 2);
        let warm = store.stats();
        for seed in 3..6 {
            step(&mut store, seed);
        }
        let after = store.stats();
        assert!(after.flash_reads - warm.flash_reads > 100, "the tier must cycle: {after:?}");
        assert_eq!(after.buffers_mapped, warm.buffers_mapped, "buffers mapped after the first step");
        assert!(after.dram_bytes_peak <= budget, "DRAM peak {} over budget {budget}", after.dram_bytes_peak);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_budget_that_holds_the_model_never_touches_flash_until_a_checkpoint() {
        // The whole state stays in DRAM: the disk need not hold the model.
        let spec = spec();
        let params = random_params(&spec, 1);
        let total = 16 * Layout::new(&spec, 256).slab_params.iter().sum::<usize>() as u64;
        let dir = tmp("all-dram");
        let mut store = Store::create(&spec, &params, None, 0, &dir, cfg(total)).unwrap();
        let mut reference = Store::create(&spec, &params, None, 0, &tmp("all-dram-ref"), cfg(total / 3)).unwrap();
        for seed in 2..5 {
            let grads = random_params(&spec, seed);
            assert_eq!(one_step(&mut store, &spec, &grads, 0.01), one_step(&mut reference, &spec, &grads, 0.01));
        }
        let st = store.stats();
        assert_eq!((st.flash_read_bytes, st.flash_write_bytes), (0, 0), "{st:?}");
        assert!(reference.stats().flash_write_bytes > 0, "a third of the state must spill");
        let on_disk: u64 = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert_eq!(on_disk, 0, "no slab file was written");
        assert_eq!(store.snapshot().unwrap(), reference.snapshot().unwrap());
        let ckpt = tmp("all-dram-ckpt");
        store.checkpoint(&ckpt, "").unwrap();
        let (mut restored, _) = Store::restore(&spec, &ckpt, &tmp("all-dram-back"), cfg(total)).unwrap();
        assert_eq!(restored.snapshot().unwrap(), store.snapshot().unwrap());
        for name in ["all-dram", "all-dram-ref", "all-dram-ckpt", "all-dram-back"] {
            let _ = std::fs::remove_dir_all(tmp(name));
        }
    }

    #[test]
    fn slabs_filled_in_parallel_equal_slabs_filled_in_order() {
        // Each parameter's value is a function of its place, so any order of
        // filling gives the same store; half the pages go to flash.
        let spec = spec();
        let total = 16 * Layout::new(&spec, 256).slab_params.iter().sum::<usize>() as u64;
        let value = |s: usize, p: usize, region: usize| (s * 100_000 + p * 4 + region) as f32;
        let fill = |s: usize, p0: usize, p1: usize, page: &mut [f32]| {
            let len = p1 - p0;
            for (j, x) in page.iter_mut().enumerate() {
                if j / len != 1 {
                    *x = value(s, p0 + j % len, j / len);
                }
            }
            Ok(())
        };
        let mut ordered = Store::create_with(&spec, 0, &tmp("fill-ordered"), cfg(total / 2), fill).unwrap();
        let mut parallel = Store::create_parallel(&spec, 0, &tmp("fill-parallel"), cfg(total / 2), |s| {
            move |p0, p1, page: &mut [f32]| fill(s, p0, p1, page)
        })
        .unwrap();
        assert_eq!(ordered.stats(), parallel.stats());
        assert!(parallel.stats().flash_write_bytes > 0 && parallel.stats().dram_bytes > 0);
        assert_eq!(ordered.snapshot().unwrap(), parallel.snapshot().unwrap());
        assert_eq!(parallel.snapshot().unwrap().0.tensors[0][3], value(0, 3, 0));
        for name in ["fill-ordered", "fill-parallel"] {
            let _ = std::fs::remove_dir_all(tmp(name));
        }
    }

    #[test]
    fn a_budget_below_one_layer_is_refused() {
        let spec = spec();
        let e = Store::create(&spec, &Params::zeros(&spec), None, 0, &tmp("small"), cfg(1000)).err().unwrap();
        assert!(matches!(e, StoreError::BudgetTooSmall { .. }), "{e}");
    }

    #[test]
    fn a_flipped_byte_in_a_slab_file_is_detected() {
        let spec = spec();
        let dir = tmp("flip");
        let layout = Layout::new(&spec, 256);
        let min = layout.min_dram_bytes();
        let mut store = Store::create(&spec, &random_params(&spec, 2), None, 0, &dir, cfg(min)).unwrap();
        let path = dir.join("slab-00002.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        let mut out = vec![0f32; layout.layer_params(&spec, 2)];
        let e = store.read_layer(2, &mut out).unwrap_err().to_string();
        assert!(e.contains("slab-00002.bin") && e.contains("layer 2") && e.contains("corrupt"), "{e}");
    }

    /// A checkpoint of a store whose tier is short reads the pages it does
    /// not hold into the tier's own buffers (evicting others): the DRAM
    /// budget holds through it, and the checkpoint restores exactly.
    #[test]
    fn a_checkpoint_of_a_short_tier_stays_within_its_budget_and_restores_exactly() {
        let spec = spec();
        let params = random_params(&spec, 3);
        let budget = 2 * Layout::new(&spec, 256).min_dram_bytes();
        let mut store = Store::create(&spec, &params, None, 0, &tmp("short-store"), cfg(budget)).unwrap();
        for seed in 4..6 {
            one_step(&mut store, &spec, &random_params(&spec, seed), 0.01);
        }
        let ckpt = tmp("short-ckpt");
        store.checkpoint(&ckpt, "").unwrap();
        let st = store.stats();
        assert!(st.flash_read_bytes > 0 && st.dram_bytes_peak <= budget, "{st:?} against {budget}");
        let want = store.snapshot().unwrap();
        let (mut back, _) = Store::restore(&spec, &ckpt, &tmp("short-back"), cfg(u64::MAX)).unwrap();
        assert!(back.snapshot().unwrap() == want);
        for d in ["short-store", "short-ckpt", "short-back"] {
            let _ = std::fs::remove_dir_all(tmp(d));
        }
    }

    #[test]
    fn checkpoints_restore_exactly_and_detect_corruption() {
        let spec = spec();
        let params = random_params(&spec, 3);
        let ckpt = tmp("ckpt");
        let mut store = Store::create(&spec, &params, None, 0, &tmp("ck-store"), cfg(u64::MAX)).unwrap();
        one_step(&mut store, &spec, &random_params(&spec, 4), 0.01);
        let first = store.checkpoint(&ckpt, "a = 1").unwrap();
        one_step(&mut store, &spec, &random_params(&spec, 5), 0.01);
        let m = store.checkpoint(&ckpt, "a = 2").unwrap();
        assert_eq!((first.step, m.step), (1, 2));
        assert!(!ckpt.join(&first.slabs[0].file).exists(), "the older snapshot is removed once the new one is durable");
        let want = store.snapshot().unwrap();
        let (mut restored, manifest) = Store::restore(&spec, &ckpt, &tmp("ck-restored"), cfg(u64::MAX)).unwrap();
        assert_eq!(manifest.run_toml, "a = 2");
        assert_eq!(restored.version, 2);
        assert_eq!(restored.snapshot().unwrap(), want);

        let path = ckpt.join(&m.slabs[1].file);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[7] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = Store::restore(&spec, &ckpt, &tmp("ck-bad"), cfg(u64::MAX)).err().unwrap().to_string();
        assert!(e.contains(&m.slabs[1].file) && e.contains("layer 1"), "{e}");
    }
}
