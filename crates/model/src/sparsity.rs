//! Selectable sparsity: which entries of each sparse tensor exist.
//!
//! A sparse tensor ([`crate::TensorSpec::nnz`]) is stored, streamed, summed
//! and updated as a flat array of its nonzero values, in the order of its
//! [`SparsePattern`] (column by column of the `[in, out]` matrix). The
//! patterns live here, apart from the values: the store owns them (it
//! chooses them, and changes them when sparsity is dynamic), and a worker
//! holds a copy to compute with. Where a dense tensor is needed (a
//! Hugging Face export, a dense checkpoint going in), [`Masks::unpack`] and
//! [`Masks::pack`] convert.
//!
//! The initial pattern keeps the entries of largest magnitude: of the
//! initialisation ([`Masks::init`]) or of a dense checkpoint
//! ([`Masks::from_dense`]). Counts are exact: a tensor at sparsity s keeps
//! round((1 - s) * numel) entries, and [`Masks::check`] holds every pattern
//! to it.
//!
//! On disk the patterns are a safetensors file with one index per sparse
//! tensor under the tensor's name, chosen by density: a U8 bitmap (bit i % 8
//! of byte i / 8 is element i of the row-major `[in, out]` matrix), or below
//! density 1/16, where it is smaller, U16 gaps between the nonzeros'
//! positions ([`SparsePattern::to_gaps`]).

use crate::params::init_dense_tensor;
use crate::{ModelSpec, Params};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use ws_kernels::sparse::{top_magnitude_mask, SparsePattern};

pub const MASKS_FILE: &str = "masks.safetensors";
/// The metadata key of a masks file: `{"bit_order": ..., "version": N}`.
const MASKS_META: &str = "weightstream_masks";

#[derive(Clone, Debug, PartialEq)]
pub struct Masks {
    /// Per tensor of the spec: the pattern of a sparse tensor, `None` for a dense one.
    pub patterns: Vec<Option<Arc<SparsePattern>>>,
    /// Raised at every change of a pattern, so a worker can tell whether its copy is current.
    pub version: u64,
}

impl Masks {
    /// No sparse tensors.
    pub fn dense(spec: &ModelSpec) -> Masks {
        Masks { patterns: vec![None; spec.tensors.len()], version: 0 }
    }

    /// The patterns of the initial weights from `seed`: the largest
    /// magnitudes of each sparse tensor's dense initialisation.
    pub fn init(spec: &ModelSpec, seed: u64) -> Masks {
        let patterns = (0..spec.tensors.len())
            .into_par_iter()
            .map(|t| {
                spec.tensors[t].is_sparse().then(|| Arc::new(top_pattern(spec, t, &init_dense_tensor(spec, t, seed))))
            })
            .collect();
        Masks { patterns, version: 0 }
    }

    /// The patterns of the largest magnitudes of dense weights (`dense`
    /// holds every tensor at its full size).
    pub fn from_dense(spec: &ModelSpec, dense: &Params) -> Masks {
        let patterns = (0..spec.tensors.len())
            .into_par_iter()
            .map(|t| spec.tensors[t].is_sparse().then(|| Arc::new(top_pattern(spec, t, &dense.tensors[t]))))
            .collect();
        Masks { patterns, version: 0 }
    }

    pub fn get(&self, t: usize) -> Option<&SparsePattern> {
        self.patterns[t].as_deref()
    }

    pub fn is_sparse(&self) -> bool {
        self.patterns.iter().any(Option::is_some)
    }

    /// Whether these patterns fit `spec`: a pattern for exactly the sparse
    /// tensors, of their shape, with their number of nonzeros.
    pub fn check(&self, spec: &ModelSpec) -> Result<(), String> {
        if self.patterns.len() != spec.tensors.len() {
            return Err(format!("masks for {} tensors, the model has {}", self.patterns.len(), spec.tensors.len()));
        }
        for (ts, p) in spec.tensors.iter().zip(&self.patterns) {
            match (ts.nnz, p) {
                (None, None) => {}
                (Some(_), None) => return Err(format!("no mask for the sparse tensor {}", ts.name)),
                (None, Some(_)) => return Err(format!("a mask for the dense tensor {}", ts.name)),
                (Some(nnz), Some(p)) => {
                    if [p.k, p.n] != ts.shape[..] || p.nnz() != nnz {
                        return Err(format!(
                            "the mask of {} is {}x{} with {} nonzeros; the model wants {:?} with {nnz}",
                            ts.name,
                            p.k,
                            p.n,
                            p.nnz(),
                            ts.shape
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Dense weights (every tensor at full size) to stored ones: the values
    /// at the nonzeros of each sparse tensor.
    pub fn pack(&self, dense: &Params) -> Params {
        let tensors = dense
            .tensors
            .par_iter()
            .zip(&self.patterns)
            .map(|(d, p)| match p {
                Some(p) => p.gather(d),
                None => d.clone(),
            })
            .collect();
        Params { tensors }
    }

    /// Stored weights to dense ones, zeros where masked.
    pub fn unpack(&self, stored: &Params) -> Params {
        let tensors = stored
            .tensors
            .par_iter()
            .zip(&self.patterns)
            .map(|(v, p)| match p {
                Some(p) => {
                    let mut d = vec![0f32; p.k * p.n];
                    p.scatter(v, &mut d);
                    d
                }
                None => v.clone(),
            })
            .collect();
        Params { tensors }
    }

    /// The bitmaps as a safetensors file's bytes (see the module docs).
    pub fn to_safetensors(&self, spec: &ModelSpec) -> Vec<u8> {
        // Each tensor's index as a bitmap (U8), or as gaps between positions
        // (U16) where that is smaller: below density 1/16.
        let encoded: Vec<(String, safetensors::Dtype, Vec<u8>)> = self
            .patterns
            .iter()
            .enumerate()
            .filter_map(|(t, p)| p.as_ref().map(|p| (spec.tensors[t].name.clone(), p)))
            .map(|(name, p)| {
                let gaps = p.to_gaps();
                if 2 * gaps.len() < (p.k * p.n).div_ceil(8) {
                    (name, safetensors::Dtype::U16, gaps.iter().flat_map(|g| g.to_le_bytes()).collect())
                } else {
                    (name, safetensors::Dtype::U8, p.to_bitmap())
                }
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = encoded
            .iter()
            .map(|(name, dtype, b)| {
                let len = 8 * b.len() / dtype.bitsize();
                let view =
                    safetensors::tensor::TensorView::new(*dtype, vec![len], b).expect("shape matches data length");
                (name.clone(), view)
            })
            .collect();
        // One metadata entry: safetensors keeps metadata in a hash map, and
        // a file's bytes should not depend on its order.
        let about = serde_json::json!({
            "index": "U8: a bitmap, element i of the row-major [in, out] matrix at bit i%8 of byte i/8; U16: the gaps between nonzero positions (each minus the previous minus 1, in base 65535: 0xFFFF runs then the rest)",
            "version": self.version,
        });
        let meta = HashMap::from([(MASKS_META.to_string(), about.to_string())]);
        safetensors::serialize(views, Some(meta)).expect("bitmaps serialize")
    }

    /// Sets each sparse tensor's count of nonzeros in `spec` to its pattern's
    /// (a worker following a store whose sparsity ramps up).
    pub fn apply_to(&self, spec: &mut ModelSpec) {
        for (ts, p) in spec.tensors.iter_mut().zip(&self.patterns) {
            if let (Some(nnz), Some(p)) = (ts.nnz.as_mut(), p) {
                *nnz = p.nnz();
            }
        }
    }

    /// Reads [`Self::to_safetensors`]'s bytes for `spec` (the sparse tensors
    /// and their shapes; the counts are the file's, see [`Self::check`]); the
    /// error says what does not fit.
    pub fn from_safetensors(spec: &ModelSpec, bytes: &[u8]) -> Result<Masks, String> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| format!("not a masks file: {e}"))?;
        let version = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(MASKS_META))
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
            .and_then(|v| v["version"].as_u64())
            .ok_or("not a weightstream masks file (no version in its metadata)")?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("not a masks file: {e}"))?;
        let mut patterns = vec![None; spec.tensors.len()];
        for (name, view) in st.tensors() {
            let t =
                spec.tensor_index(&name).ok_or_else(|| format!("a mask for {name}, which the model does not have"))?;
            let shape = &spec.tensors[t].shape;
            if shape.len() != 2 {
                return Err(format!("a mask for {name}, which is not a matrix"));
            }
            let p = match view.dtype() {
                safetensors::Dtype::U8 => {
                    SparsePattern::from_bitmap(view.data(), shape[0], shape[1]).ok_or_else(|| {
                        format!("the mask of {name} has {} bytes, not a {shape:?} bitmap", view.data().len())
                    })?
                }
                safetensors::Dtype::U16 => {
                    let gaps: Vec<u16> =
                        view.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                    SparsePattern::from_gaps(&gaps, shape[0], shape[1])
                        .ok_or_else(|| format!("the mask of {name} has positions outside its {shape:?} matrix"))?
                }
                other => return Err(format!("the mask of {name} is {other:?}, not a U8 bitmap or U16 gaps")),
            };
            patterns[t] = Some(Arc::new(p));
        }
        let masks = Masks { patterns, version };
        let mut counted = spec.clone();
        masks.apply_to(&mut counted);
        masks.check(&counted)?;
        Ok(masks)
    }
}

/// Where a prune-and-regrow update puts the nonzeros it adds.
pub enum Regrow<'a> {
    /// At random among the zeros (SET), drawn from this generator.
    Random(&'a mut ws_kernels::Rng),
    /// Where the dense gradient (every element of the matrix) is largest
    /// in magnitude (RigL).
    Gradient(&'a [f32]),
}

/// One prune-and-regrow update of a sparse matrix with `values` in
/// `pattern`'s order: the `round(fraction * nnz)` nonzeros of smallest
/// magnitude go (equal magnitudes: the lower position first), and as many
/// zeros that were zero before the update become nonzeros. The number of
/// nonzeros never changes. Returns the new pattern and, for each of its
/// values, the old value it keeps (`None`: regrown, starts at zero, as do
/// its optimizer moments).
pub fn prune_regrow(
    pattern: &SparsePattern,
    values: &[f32],
    fraction: f64,
    regrow: Regrow,
) -> (SparsePattern, Vec<Option<u32>>) {
    let (k, n, nnz) = (pattern.k, pattern.n, pattern.nnz());
    assert_eq!(values.len(), nnz);
    let zeros = k * n - nnz;
    let moved = ((fraction * nnz as f64).round() as usize).min(zeros);
    // The old value at each position, or u32::MAX.
    let mut old = vec![u32::MAX; k * n];
    for (p, pos) in pattern.positions().enumerate() {
        old[pos] = p as u32;
    }
    let mut mask = pattern.mask();
    if moved > 0 {
        // Smallest magnitudes first, ties by position.
        let mut by_size: Vec<(f32, usize)> = pattern.positions().zip(values).map(|(pos, v)| (v.abs(), pos)).collect();
        by_size.select_nth_unstable_by(moved - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let candidates: Vec<usize> = (0..k * n).filter(|&i| !mask[i]).collect();
        for &(_, pos) in &by_size[..moved] {
            mask[pos] = false;
        }
        let grown: Vec<usize> = match regrow {
            Regrow::Random(rng) => {
                // A partial Fisher-Yates shuffle of the candidates.
                let mut c = candidates;
                for i in 0..moved {
                    let j = i + rng.below((c.len() - i) as u64) as usize;
                    c.swap(i, j);
                }
                c.truncate(moved);
                c
            }
            Regrow::Gradient(g) => {
                assert_eq!(g.len(), k * n);
                let sub: Vec<f32> = candidates.iter().map(|&i| g[i]).collect();
                ws_kernels::sparse::top_magnitude(&sub, moved).map(|j| candidates[j]).collect()
            }
        };
        for pos in grown {
            debug_assert!(old[pos] == u32::MAX && !mask[pos]);
            mask[pos] = true;
        }
    }
    let new = SparsePattern::from_mask(&mask, k, n);
    let from = new.positions().map(|pos| (old[pos] != u32::MAX).then_some(old[pos])).collect();
    (new, from)
}

/// A stage of the sparsity ramp: of a matrix's nonzeros (`values` in
/// `pattern`'s order), only the `nnz` of largest magnitude stay (equal
/// magnitudes: the lower position). Returns the new pattern and where each
/// of its values comes from.
pub fn shrink(pattern: &SparsePattern, values: &[f32], nnz: usize) -> (SparsePattern, Vec<Option<u32>>) {
    assert!(nnz <= pattern.nnz());
    let positions: Vec<usize> = pattern.positions().collect();
    let mut mask = vec![false; pattern.k * pattern.n];
    // top_magnitude breaks ties by index in the values' order; position order
    // is what the mask needs, so sort the candidates by (magnitude, position).
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    let by = |a: &u32, b: &u32| {
        values[*b as usize]
            .abs()
            .total_cmp(&values[*a as usize].abs())
            .then(positions[*a as usize].cmp(&positions[*b as usize]))
    };
    if nnz > 0 && nnz < order.len() {
        order.select_nth_unstable_by(nnz - 1, by);
    }
    for &p in &order[..nnz] {
        mask[positions[p as usize]] = true;
    }
    let new = SparsePattern::from_mask(&mask, pattern.k, pattern.n);
    let mut old = vec![u32::MAX; pattern.k * pattern.n];
    for (p, &pos) in positions.iter().enumerate() {
        old[pos] = p as u32;
    }
    let from = new.positions().map(|pos| Some(old[pos])).collect();
    (new, from)
}

/// `values` moved into a new pattern's order (see [`prune_regrow`]), zero where regrown.
pub fn remap(values: &[f32], from: &[Option<u32>]) -> Vec<f32> {
    from.iter().map(|o| o.map_or(0.0, |p| values[p as usize])).collect()
}

/// The pattern of tensor `t`'s nonzeros: its `nnz` entries of largest magnitude in `dense`.
fn top_pattern(spec: &ModelSpec, t: usize, dense: &[f32]) -> SparsePattern {
    let ts = &spec.tensors[t];
    let nnz = ts.nnz.expect("a sparse tensor");
    let mask = top_magnitude_mask(dense, nnz as f64 / ts.numel() as f64);
    debug_assert_eq!(mask.iter().filter(|&&m| m).count(), nnz);
    SparsePattern::from_mask(&mask, ts.shape[0], ts.shape[1])
}

/// The stored initial values of sparse tensor `t`: its largest initial values, packed.
pub(crate) fn init_packed(spec: &ModelSpec, t: usize, seed: u64) -> Vec<f32> {
    let dense = init_dense_tensor(spec, t, seed);
    top_pattern(spec, t, &dense).gather(&dense)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gpt2Config;

    fn spec() -> ModelSpec {
        let mut s = ModelSpec::new(Gpt2Config { n_layer: 2, n_head: 2, n_embd: 16, block_size: 8, vocab_size: 40 });
        for (t, level) in [(4usize, 0.75), (10, 0.97), (16, 0.5)] {
            s.set_sparsity(t, level).unwrap();
        }
        s
    }

    #[test]
    fn only_linear_weights_can_be_sparse_and_counts_are_exact() {
        let mut s = spec();
        assert_eq!(s.tensors[4].nnz, Some(16 * 48 / 4));
        assert_eq!(s.tensors[10].nnz, Some((0.03f64 * 16.0 * 64.0).round() as usize));
        assert!(s.set_sparsity(0, 0.5).unwrap_err().contains("transformer.wte.weight cannot be sparse"));
        assert!(s.set_sparsity(5, 0.5).is_err(), "a bias stays dense");
        assert!(s.set_sparsity(4, 1.0).is_err());
        s.set_sparsity(4, 0.0).unwrap();
        assert!(!s.tensors[4].is_sparse());
    }

    #[test]
    fn init_keeps_the_largest_initial_values_and_packs_them() {
        let s = spec();
        let masks = Masks::init(&s, 7);
        masks.check(&s).unwrap();
        let packed = Params::init(&s, 7);
        let dense: Params = Params { tensors: (0..s.tensors.len()).map(|t| init_dense_tensor(&s, t, 7)).collect() };
        assert_eq!(masks.pack(&dense), packed);
        let unpacked = masks.unpack(&packed);
        for t in [4usize, 10, 16] {
            let (d, u) = (&dense.tensors[t], &unpacked.tensors[t]);
            let kept: Vec<f32> = u.iter().copied().filter(|&x| x != 0.0).collect();
            assert_eq!(kept.len(), s.tensors[t].nnz.unwrap());
            let smallest_kept = kept.iter().fold(f32::INFINITY, |m, x| m.min(x.abs()));
            let largest_dropped = d.iter().zip(u).filter(|(_, &x)| x == 0.0).fold(0f32, |m, (y, _)| m.max(y.abs()));
            assert!(largest_dropped <= smallest_kept, "tensor {t}");
        }
        assert_eq!(Masks::from_dense(&s, &dense), masks);
    }

    #[test]
    fn prune_regrow_keeps_the_count_and_moves_the_smallest() {
        let mut rng = ws_kernels::Rng::new(4);
        let (k, n) = (12, 10);
        let mut w = vec![0f32; k * n];
        rng.fill_normal(&mut w, 0.0, 1.0);
        let pattern = SparsePattern::from_mask(&top_magnitude_mask(&w, 0.3), k, n);
        let values = pattern.gather(&w);
        let mut g = vec![0f32; k * n];
        rng.fill_normal(&mut g, 0.0, 1.0);
        for (name, regrow) in [("set", 0), ("rigl", 1)] {
            let mut r = ws_kernels::Rng::new(9);
            let how = if regrow == 0 { Regrow::Random(&mut r) } else { Regrow::Gradient(&g) };
            let (new, from) = prune_regrow(&pattern, &values, 0.25, how);
            assert_eq!(new.nnz(), pattern.nnz(), "{name}");
            let moved = (0.25f64 * 36.0).round() as usize;
            assert_eq!(from.iter().filter(|f| f.is_none()).count(), moved, "{name}");
            let kept = remap(&values, &from);
            // The survivors are the largest old values, unchanged.
            let (old_mask, new_mask) = (pattern.mask(), new.mask());
            let mut survivors: Vec<f32> =
                kept.iter().zip(&from).filter(|(_, f)| f.is_some()).map(|(v, _)| v.abs()).collect();
            survivors.sort_by(f32::total_cmp);
            let mut all: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            all.sort_by(f32::total_cmp);
            assert_eq!(survivors, all[moved..].to_vec(), "{name}");
            // Regrown only where the old mask was zero.
            for i in 0..k * n {
                if new_mask[i] && !old_mask[i] {
                    assert_eq!(kept[new.positions().position(|p| p == i).unwrap()], 0.0);
                }
            }
            if regrow == 1 {
                // The regrown positions hold the largest gradients among the old zeros.
                let grown: Vec<usize> = (0..k * n).filter(|&i| new_mask[i] && !old_mask[i]).collect();
                let least = grown.iter().map(|&i| g[i].abs()).fold(f32::INFINITY, f32::min);
                let best_left =
                    (0..k * n).filter(|&i| !old_mask[i] && !new_mask[i]).map(|i| g[i].abs()).fold(0f32, f32::max);
                assert!(best_left <= least);
            }
        }
    }

    #[test]
    fn shrink_keeps_the_largest_values_in_the_new_order() {
        let mut rng = ws_kernels::Rng::new(2);
        let (k, n) = (9, 7);
        let mut w = vec![0f32; k * n];
        rng.fill_normal(&mut w, 0.0, 1.0);
        let full = SparsePattern::from_mask(&vec![true; k * n], k, n);
        let values = full.gather(&w);
        let (p, from) = shrink(&full, &values, 20);
        assert_eq!(p.nnz(), 20);
        assert_eq!(p, SparsePattern::from_mask(&top_magnitude_mask(&w, 20.0 / 63.0), k, n));
        assert_eq!(remap(&values, &from), p.gather(&w));
        let (q, from) = shrink(&p, &p.gather(&w), 5);
        assert_eq!(q, SparsePattern::from_mask(&top_magnitude_mask(&w, 5.0 / 63.0), k, n));
        assert_eq!(remap(&p.gather(&w), &from), q.gather(&w));
    }

    #[test]
    fn masks_round_trip_through_safetensors_and_bad_files_are_refused() {
        let s = spec();
        let mut masks = Masks::init(&s, 3);
        masks.version = 5;
        let bytes = masks.to_safetensors(&s);
        assert!((0..20).all(|_| masks.to_safetensors(&s) == bytes), "the same masks, the same bytes");
        // The index by density: a bitmap at 25% and 50%, gaps at 3%.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let dtype = |t: usize| st.tensor(&s.tensors[t].name).unwrap().dtype();
        assert_eq!(
            (dtype(4), dtype(10), dtype(16)),
            (safetensors::Dtype::U8, safetensors::Dtype::U16, safetensors::Dtype::U8)
        );
        assert_eq!(Masks::from_safetensors(&s, &bytes).unwrap(), masks);
        assert!(Masks::from_safetensors(&s, &bytes[..bytes.len() - 1]).is_err());
        assert!(Masks::from_safetensors(&s, b"garbage").is_err());
        let mut other = s.clone();
        other.set_sparsity(4, 0.5).unwrap();
        // The counts are the file's; a reader that knows them checks them.
        let e = Masks::from_safetensors(&other, &bytes).unwrap().check(&other).unwrap_err();
        assert!(e.contains("transformer.h.0.attn.c_attn.weight"), "{e}");
        let mut dense = s.clone();
        dense.set_sparsity(10, 0.0).unwrap();
        assert!(Masks::from_safetensors(&dense, &bytes).unwrap_err().contains("dense tensor"));
    }
}
