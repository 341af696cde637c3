//! A resident parameter set: one `Vec<f32>` per tensor of a [`ModelSpec`].
//!
//! Used for the resident baseline, for gradients and optimizer moments of a
//! resident run, and for loading and saving checkpoints. Layers never see a
//! `Params`: they are handed the slices of their own tensors.

use crate::spec::ModelSpec;
use ws_kernels::Rng;

/// Stream id of weight initialisation in [`Rng::for_stream`].
const INIT_STREAM: u64 = 1;

/// Initialises tensor `i` of `spec` into `out` (see [`Params::init`]): its
/// stored values, the nonzeros only for a sparse tensor.
pub fn init_tensor(spec: &ModelSpec, i: usize, seed: u64, out: &mut [f32]) {
    assert_eq!(out.len(), spec.tensors[i].len());
    TensorInit::new(spec, i, seed).fill_next(out);
}

/// The dense initial values of tensor `i`, every element (a sparse tensor's
/// nonzeros are the largest of these).
pub fn init_dense_tensor(spec: &ModelSpec, i: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; spec.tensors[i].numel()];
    TensorInit::dense(spec, i, seed).fill_next(&mut out);
    out
}

/// The initial values of one tensor, produced in order piece by piece, so a
/// store can initialise a tensor larger than its memory budget a page at a
/// time and get exactly what [`init_tensor`] gives. (A sparse tensor's
/// nonzeros are chosen from the whole tensor, so they are drawn at once: a
/// sparse tensor is a linear layer's matrix, never larger than a layer.)
pub struct TensorInit {
    rng: Rng,
    std: Option<f32>,
    constant: f32,
    /// A sparse tensor's stored values and how many were handed out.
    packed: Option<(Vec<f32>, usize)>,
}

impl TensorInit {
    pub fn new(spec: &ModelSpec, i: usize, seed: u64) -> TensorInit {
        let mut init = TensorInit::dense(spec, i, seed);
        if spec.tensors[i].is_sparse() {
            init.packed = Some((crate::sparsity::init_packed(spec, i, seed), 0));
        }
        init
    }

    fn dense(spec: &ModelSpec, i: usize, seed: u64) -> TensorInit {
        let t = &spec.tensors[i];
        TensorInit {
            rng: Rng::for_stream(seed, INIT_STREAM, i as u64),
            std: t.init_std,
            constant: if t.is_layernorm_weight() { 1.0 } else { 0.0 },
            packed: None,
        }
    }

    /// The next `out.len()` values.
    pub fn fill_next(&mut self, out: &mut [f32]) {
        if let Some((values, at)) = &mut self.packed {
            out.copy_from_slice(&values[*at..*at + out.len()]);
            *at += out.len();
            return;
        }
        match self.std {
            Some(std) => self.rng.fill_normal(out, 0.0, std),
            None => out.fill(self.constant),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub tensors: Vec<Vec<f32>>,
}

impl Params {
    pub fn zeros(spec: &ModelSpec) -> Params {
        Params { tensors: spec.tensors.iter().map(|t| vec![0f32; t.len()]).collect() }
    }

    /// GPT-2 initialisation: normal(0, 0.02) for weights and embeddings,
    /// 0.02/sqrt(2 n_layer) for the residual projections, LayerNorm weights
    /// one, biases zero. Each tensor draws from its own seeded stream. A
    /// sparse tensor keeps the values of largest magnitude of its draw
    /// ([`crate::Masks::init`] gives their pattern).
    pub fn init(spec: &ModelSpec, seed: u64) -> Params {
        use rayon::prelude::*;
        let mut p = Params::zeros(spec);
        // Each tensor draws from its own stream: the same values in parallel.
        p.tensors.par_iter_mut().enumerate().for_each(|(i, data)| init_tensor(spec, i, seed, data));
        p
    }

    /// The slices of layer `l`'s tensors, in the layer's order.
    pub fn layer(&self, spec: &ModelSpec, l: usize) -> Vec<&[f32]> {
        spec.layers[l].tensors.iter().map(|&i| self.tensors[i].as_slice()).collect()
    }

    /// Mutable slices of layer `l`'s tensors, in the layer's order.
    pub fn layer_mut(&mut self, spec: &ModelSpec, l: usize) -> Vec<&mut [f32]> {
        let ids = &spec.layers[l].tensors;
        let mut slots: Vec<Option<&mut [f32]>> = self.tensors.iter_mut().map(|t| Some(t.as_mut_slice())).collect();
        ids.iter().map(|&i| slots[i].take().expect("a layer lists each tensor once")).collect()
    }

    pub fn fill(&mut self, value: f32) {
        for t in &mut self.tensors {
            t.fill(value);
        }
    }

    /// Sum of squares of every element, in f64: each tensor's
    /// [`ws_kernels::math::tensor_sum_of_squares`], added in tensor order
    /// (the store computes the same, page by page).
    pub fn sum_of_squares(&self) -> f64 {
        self.tensors.iter().map(|t| ws_kernels::math::tensor_sum_of_squares(t)).fold(0.0, |a, x| a + x)
    }
}
