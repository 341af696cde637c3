//! Activations and the per-layer forward and backward passes.
//!
//! A [`Workspace`] holds everything one micro-batch needs between its forward
//! and backward passes, sized once for `b_max` sequences of `t_max` tokens;
//! a call may use a smaller `b`, `t` (evaluation tails, generation).
//!
//! The step is: `forward(l)` for l = 0..L-1 (embedding, blocks), then
//! `head` (final LayerNorm, tied projection, cross-entropy, and, when training,
//! its backward right away since the head is the last layer), then
//! `backward(l)` for l = L-2..0. Weights arrive as slices in the layer's
//! tensor order ([`crate::LayerSpec::tensors`]); parameter gradients
//! accumulate (`+=`) into the slices given, so micro-batches and the tied
//! embedding sum naturally. The residual-stream gradient lives in `dres` and
//! is carried from one `backward` call to the next.

use crate::spec::{block, LayerKind, ModelSpec};
use crate::Masks;
use ws_kernels::attention::{attention_backward, attention_forward};
use ws_kernels::crossentropy::crossentropy_forward_backward;
use ws_kernels::embedding::{embedding_backward, embedding_forward};
use ws_kernels::gelu::{gelu_backward_inplace, gelu_forward};
use ws_kernels::layernorm::{layernorm_backward, layernorm_forward};
use ws_kernels::matmul::{bias_backward, gemm, matmul_backward, matmul_forward, pool_threads, Mat};
use ws_kernels::parallel::add_inplace;
use ws_kernels::sparse::{self, SparsePattern};
use ws_kernels::{bf16, Precision};

/// How the linear layers treat sparse weights: the patterns, the density at
/// or below which the sparse kernels run (above it, the dense GEMM on the
/// weights expanded with zeros is faster), and their scratch.
pub struct SparseLinear {
    masks: Masks,
    /// Sparse kernels for densities up to this; see [`Workspace::set_masks`].
    pub crossover: f64,
    dense_w: Vec<f32>,
    dense_dw: Vec<f32>,
    scratch: sparse::Scratch,
    /// While set, the dense weight gradient of each sparse tensor (every
    /// element, for RigL's regrowth) is added here as well.
    capture: Option<Vec<Option<Vec<f32>>>>,
}

/// The density up to which the sparse kernels beat the dense GEMM for the
/// GPT-2 small layer shapes on the development machine (`weightstream bench
/// sparsity`, BENCHMARKS.md, session 14, three sittings: at 65% sparsity,
/// density 0.35, they ran at 1.09-1.33 times dense on every shape; at 60%
/// at 1.00-1.15, a margin inside the sittings' noise, so not taken; at 50%
/// at 0.88-0.99).
pub const SPARSE_CROSSOVER_DENSITY: f64 = 0.35;

fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Whether a sparse tensor of `density` runs through the sparse kernels
/// (else through the dense GEMM on its masked matrix).
pub fn runs_sparse_kernels(density: f64, crossover: f64) -> bool {
    density <= crossover
}

/// Which path tensor `t` takes: its pattern when the sparse kernels run.
fn sparse_path(masks: &Masks, crossover: f64, t: usize) -> Option<&SparsePattern> {
    masks.get(t).filter(|p| runs_sparse_kernels(p.density(), crossover))
}

/// `out[BT,N] = inp[BT,K] @ W + bias` for tensor `t` (its stored values `w`).
#[allow(clippy::too_many_arguments)]
fn linear_forward(
    p: Precision,
    sp: &mut SparseLinear,
    t: usize,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    bt: usize,
    k: usize,
    n: usize,
) {
    if let Some(pat) = sparse_path(&sp.masks, sp.crossover, t) {
        return sparse::forward(out, inp, pat, w, bias, bt);
    }
    let w = match sp.masks.get(t) {
        Some(pat) => {
            let dense = sized(&mut sp.dense_w, k * n);
            pat.scatter(w, dense);
            &*dense
        }
        None => w,
    };
    match p {
        Precision::Fp32 => matmul_forward(out, inp, w, bias, bt, k, n),
        Precision::Bf16 => bf16::matmul_forward(out, inp, w, bias, bt, k, n),
    }
}

/// Backward of [`linear_forward`]: `dinp` overwritten, `dw` (the stored
/// values' gradient: at the nonzeros only, for a sparse tensor) and `dbias` added to.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    p: Precision,
    sp: &mut SparseLinear,
    t: usize,
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    bt: usize,
    k: usize,
    n: usize,
) {
    if let Some(pat) = sparse_path(&sp.masks, sp.crossover, t) {
        sparse::backward_input(dinp, dout, pat, w, bt);
        sparse::backward_weight(dw, inp, dout, pat, bt, &mut sp.scratch);
        if let Some(db) = dbias {
            bias_backward(db, dout, bt, n);
        }
        if let Some(g) = sp.capture.as_mut().and_then(|c| c[t].as_mut()) {
            // g[K,N] += inp^T @ dout
            gemm(g, n, true, Mat::transposed(inp, k), Mat::rows(dout, n), k, n, bt, 1.0, pool_threads());
        }
        return;
    }
    let dense = |p: Precision, dinp: &mut [f32], dw: &mut [f32], dbias: Option<&mut [f32]>, w: &[f32]| match p {
        Precision::Fp32 => matmul_backward(dinp, dw, dbias, dout, inp, w, bt, k, n),
        Precision::Bf16 => bf16::matmul_backward(dinp, dw, dbias, dout, inp, w, bt, k, n),
    };
    match sp.masks.get(t) {
        Some(pat) => {
            let wd = sized(&mut sp.dense_w, k * n);
            pat.scatter(w, wd);
            let dwd = sized(&mut sp.dense_dw, k * n);
            dwd.fill(0.0);
            dense(p, dinp, dwd, dbias, wd);
            pat.gather_add(dwd, dw);
            if let Some(g) = sp.capture.as_mut().and_then(|c| c[t].as_mut()) {
                add_inplace(g, dwd);
            }
        }
        None => dense(p, dinp, dw, dbias, w),
    }
}

/// Saved activations of one transformer block. Shapes for (B, T):
struct BlockActs {
    ln1: Vec<f32>,      // [B,T,C]
    ln1_mean: Vec<f32>, // [B,T]
    ln1_rstd: Vec<f32>, // [B,T]
    qkv: Vec<f32>,      // [B,T,3C]
    att: Vec<f32>,      // [B,H,T,T]
    atty: Vec<f32>,     // [B,T,C]
    x2: Vec<f32>,       // [B,T,C] residual after attention
    ln2: Vec<f32>,      // [B,T,C]
    ln2_mean: Vec<f32>, // [B,T]
    ln2_rstd: Vec<f32>, // [B,T]
    fch: Vec<f32>,      // [B,T,4C]
    fch_gelu: Vec<f32>, // [B,T,4C]
}

pub struct Workspace {
    pub b_max: usize,
    pub t_max: usize,
    c: usize,
    nh: usize,
    v: usize,
    /// residual[i] = input of block i; residual[n_layer] = input of the head.
    residual: Vec<Vec<f32>>, // each [B,T,C]
    blocks: Vec<BlockActs>,
    lnf: Vec<f32>,      // [B,T,C]
    lnf_mean: Vec<f32>, // [B,T]
    lnf_rstd: Vec<f32>, // [B,T]
    logits: Vec<f32>,   // [head_rows, V], one chunk of rows at a time
    /// Per-position losses of the last `head` call, [B,T].
    pub losses: Vec<f32>,
    head_rows: usize,
    /// Precision of the linear layers' products (attention stays fp32).
    precision: Precision,
    /// The tied embedding rounded to bf16 for the head's products.
    wte_bf16: Vec<u16>,
    sparse: SparseLinear,
    // Backward scratch.
    dres: Vec<f32>,  // [B,T,C] gradient of the residual stream
    dln: Vec<f32>,   // [B,T,C]
    datty: Vec<f32>, // [B,T,C]
    dqkv: Vec<f32>,  // [B,T,3C]
    dfch: Vec<f32>,  // [B,T,4C]
}

/// Rows of logits computed at once: about 64 MiB of logits, at least 64 rows.
fn head_rows_for(v: usize, bt: usize) -> usize {
    ((1usize << 24) / v).clamp(64, 4096).min(bt).max(1)
}

impl Workspace {
    pub fn new(spec: &ModelSpec, b_max: usize, t_max: usize) -> Workspace {
        let cfg = spec.config;
        assert!(t_max <= cfg.block_size, "sequence {t_max} longer than block_size {}", cfg.block_size);
        let (c, nh, v) = (cfg.n_embd, cfg.n_head, cfg.vocab_size);
        let bt = b_max * t_max;
        let z = |n: usize| vec![0f32; n];
        let blocks = (0..cfg.n_layer)
            .map(|_| BlockActs {
                ln1: z(bt * c),
                ln1_mean: z(bt),
                ln1_rstd: z(bt),
                qkv: z(bt * 3 * c),
                att: z(b_max * nh * t_max * t_max),
                atty: z(bt * c),
                x2: z(bt * c),
                ln2: z(bt * c),
                ln2_mean: z(bt),
                ln2_rstd: z(bt),
                fch: z(bt * 4 * c),
                fch_gelu: z(bt * 4 * c),
            })
            .collect();
        let head_rows = head_rows_for(v, bt);
        Workspace {
            b_max,
            t_max,
            c,
            nh,
            v,
            residual: (0..=cfg.n_layer).map(|_| z(bt * c)).collect(),
            blocks,
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(head_rows * v),
            losses: z(bt),
            head_rows,
            precision: Precision::Fp32,
            wte_bf16: Vec::new(),
            sparse: SparseLinear {
                masks: Masks::dense(spec),
                crossover: SPARSE_CROSSOVER_DENSITY,
                dense_w: Vec::new(),
                dense_dw: Vec::new(),
                scratch: Default::default(),
                capture: None,
            },
            dres: z(bt * c),
            dln: z(bt * c),
            datty: z(bt * c),
            dqkv: z(bt * 3 * c),
            dfch: z(bt * 4 * c),
        }
    }

    /// Sets the precision of the linear layers and the head. bf16 must be
    /// available ([`bf16::available`]).
    pub fn set_precision(&mut self, precision: Precision) {
        if precision == Precision::Bf16 {
            bf16::available().expect("bf16 checked available before use");
        }
        self.precision = precision;
    }

    /// The patterns of the sparse tensors (their weights and gradients are
    /// then the stored values, nonzeros only), and the density up to which
    /// they run through the sparse kernels (`crossover`; above it, through
    /// the dense GEMM on the weights expanded with zeros, and the gradient
    /// taken at the nonzeros). Both paths give the same results up to fp32
    /// rounding; the choice is fixed per tensor, so runs are repeatable.
    pub fn set_masks(&mut self, masks: &Masks, crossover: f64) {
        self.sparse.masks = masks.clone();
        self.sparse.crossover = crossover;
    }

    /// From now until [`Self::take_dense_grads`], also sums the dense weight
    /// gradient (every element) of each sparse tensor: what RigL regrows by.
    pub fn capture_dense_grads(&mut self, spec: &ModelSpec) {
        self.sparse.capture = Some(spec.tensors.iter().map(|t| t.is_sparse().then(|| vec![0f32; t.numel()])).collect());
    }

    /// The dense gradients summed since [`Self::capture_dense_grads`] (per
    /// tensor; `None` for dense tensors), and the capture stops.
    pub fn take_dense_grads(&mut self) -> Option<Vec<Option<Vec<f32>>>> {
        self.sparse.capture.take()
    }

    /// The version of the patterns in use ([`Masks::version`]).
    pub fn masks_version(&self) -> u64 {
        self.sparse.masks.version
    }

    /// Bytes of the scratch the sparse linear layers may take beyond
    /// [`Self::bytes_for`]: a dense copy of the weight matrix and its
    /// gradient for sparse tensors that take the dense path, and the sparse
    /// kernels' transposed activations.
    pub fn sparse_bytes_for(spec: &ModelSpec, b: usize, t: usize) -> usize {
        let largest = spec.tensors.iter().filter(|t| t.is_sparse()).map(|t| t.numel()).max().unwrap_or(0);
        if largest == 0 {
            return 0;
        }
        let c = spec.config.n_embd;
        let tokens = (b * t).div_ceil(256) * 256;
        4 * (2 * largest + tokens * 4 * c + b * t * 4 * c)
    }

    /// Bytes of activations and scratch a workspace of this size holds.
    pub fn bytes_for(spec: &ModelSpec, b: usize, t: usize) -> usize {
        let cfg = spec.config;
        let (c, nh, bt) = (cfg.n_embd, cfg.n_head, b * t);
        let block = bt * (c * 6 + 4 + 3 * c + 8 * c) + b * nh * t * t;
        let other = (cfg.n_layer + 1) * bt * c + bt * c + 3 * bt + head_rows_for(cfg.vocab_size, bt) * cfg.vocab_size;
        let scratch = bt * c * 3 + bt * 3 * c + bt * 4 * c;
        4 * (cfg.n_layer * block + other + scratch)
    }

    fn check(&self, b: usize, t: usize) {
        assert!(b >= 1 && b <= self.b_max, "batch {b} outside 1..={}", self.b_max);
        assert!(t >= 1 && t <= self.t_max, "sequence {t} outside 1..={}", self.t_max);
    }

    /// Forward of layer `l` (the embedding or a block; the head is [`Self::head`]).
    /// `tokens[B,T]`.
    pub fn forward(&mut self, spec: &ModelSpec, l: usize, w: &[&[f32]], tokens: &[u32], b: usize, t: usize) {
        self.check(b, t);
        let (c, nh, bt) = (self.c, self.nh, b * t);
        match spec.layers[l].kind {
            LayerKind::Embedding => {
                assert_eq!(w.len(), 2);
                embedding_forward(&mut self.residual[0][..bt * c], tokens, w[0], w[1], b, t, c);
            }
            LayerKind::Block(i) => {
                assert_eq!(w.len(), block::COUNT);
                let ids = &spec.layers[l].tensors;
                let (before, after) = self.residual.split_at_mut(i + 1);
                let x = &before[i][..bt * c];
                let out = &mut after[0][..bt * c];
                let a = &mut self.blocks[i];
                let (ln1, ln1_mean, ln1_rstd) = (&mut a.ln1[..bt * c], &mut a.ln1_mean[..bt], &mut a.ln1_rstd[..bt]);
                layernorm_forward(ln1, ln1_mean, ln1_rstd, x, w[block::LN1_W], w[block::LN1_B], bt, c);
                let qkv = &mut a.qkv[..bt * 3 * c];
                linear_forward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::ATTN_W],
                    qkv,
                    ln1,
                    w[block::ATTN_W],
                    Some(w[block::ATTN_B]),
                    bt,
                    c,
                    3 * c,
                );
                let att = &mut a.att[..b * nh * t * t];
                let atty = &mut a.atty[..bt * c];
                attention_forward(atty, att, qkv, b, t, c, nh);
                let x2 = &mut a.x2[..bt * c];
                linear_forward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::PROJ_W],
                    x2,
                    atty,
                    w[block::PROJ_W],
                    Some(w[block::PROJ_B]),
                    bt,
                    c,
                    c,
                );
                add_inplace(x2, x);
                let (ln2, ln2_mean, ln2_rstd) = (&mut a.ln2[..bt * c], &mut a.ln2_mean[..bt], &mut a.ln2_rstd[..bt]);
                layernorm_forward(ln2, ln2_mean, ln2_rstd, x2, w[block::LN2_W], w[block::LN2_B], bt, c);
                let fch = &mut a.fch[..bt * 4 * c];
                linear_forward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::FC_W],
                    fch,
                    ln2,
                    w[block::FC_W],
                    Some(w[block::FC_B]),
                    bt,
                    c,
                    4 * c,
                );
                let fch_gelu = &mut a.fch_gelu[..bt * 4 * c];
                gelu_forward(fch_gelu, fch);
                linear_forward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::FCPROJ_W],
                    out,
                    fch_gelu,
                    w[block::FCPROJ_W],
                    Some(w[block::FCPROJ_B]),
                    bt,
                    4 * c,
                    c,
                );
                add_inplace(out, x2);
            }
            LayerKind::Head => panic!("the head runs through Workspace::head"),
        }
    }

    /// The head: final LayerNorm, logits against the tied embedding and
    /// cross-entropy against `targets[B,T]`. Returns the sum of the B*T
    /// losses (per-position losses stay in [`Self::losses`]).
    ///
    /// With `grads` (the head's gradient slices, accumulated), also runs the
    /// head's backward with the loss scaled by `dloss_scale` (for a mean over
    /// the whole batch: 1 / (B*T*micro-batches)), leaving the residual
    /// gradient for `backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn head(
        &mut self,
        spec: &ModelSpec,
        w: &[&[f32]],
        grads: Option<&mut [&mut [f32]]>,
        targets: &[u32],
        b: usize,
        t: usize,
        dloss_scale: f32,
    ) -> f64 {
        self.check(b, t);
        assert_eq!(w.len(), 3);
        assert_eq!(targets.len(), b * t);
        let (c, v, bt) = (self.c, self.v, b * t);
        let n_layer = spec.config.n_layer;
        let x = &self.residual[n_layer][..bt * c];
        let (lnf, lnf_mean, lnf_rstd) = (&mut self.lnf[..bt * c], &mut self.lnf_mean[..bt], &mut self.lnf_rstd[..bt]);
        layernorm_forward(lnf, lnf_mean, lnf_rstd, x, w[0], w[1], bt, c);
        let wte = w[2];
        let threads = pool_threads();
        let bf = self.precision == Precision::Bf16;
        if bf {
            bf16::to_bf16_vec(&mut self.wte_bf16, wte);
        }
        let training = grads.is_some();
        let mut grads = grads;
        let dlnf = &mut self.dln[..bt * c];
        for r0 in (0..bt).step_by(self.head_rows) {
            let r1 = (r0 + self.head_rows).min(bt);
            let rows = r1 - r0;
            let logits = &mut self.logits[..rows * v];
            let x_rows = &lnf[r0 * c..r1 * c];
            // logits[rows,V] = lnf[rows,C] @ wte^T
            if bf {
                bf16::logits_forward(logits, x_rows, &self.wte_bf16, rows, c, v);
            } else {
                gemm(logits, v, false, Mat::rows(x_rows, c), Mat::transposed(wte, c), rows, v, c, 1.0, threads);
            }
            let scale = if training { Some(dloss_scale) } else { None };
            crossentropy_forward_backward(&mut self.losses[r0..r1], logits, &targets[r0..r1], v, scale);
            if let Some(g) = grads.as_deref_mut() {
                // dlnf[rows,C] = dlogits @ wte ; dwte[V,C] += dlogits^T @ lnf
                let dx_rows = &mut dlnf[r0 * c..r1 * c];
                if bf {
                    bf16::logits_backward(dx_rows, g[2], logits, x_rows, &self.wte_bf16, rows, c, v);
                } else {
                    gemm(dx_rows, c, false, Mat::rows(logits, v), Mat::rows(wte, c), rows, c, v, 1.0, threads);
                    gemm(g[2], c, true, Mat::transposed(logits, v), Mat::rows(x_rows, c), v, c, rows, 1.0, threads);
                }
            }
        }
        if let Some(g) = grads {
            let dres = &mut self.dres[..bt * c];
            dres.fill(0.0);
            let (gw, rest) = g.split_at_mut(1);
            layernorm_backward(dres, gw[0], rest[0], dlnf, x, w[0], lnf_mean, lnf_rstd, bt, c);
        }
        self.losses[..bt].iter().map(|&l| l as f64).sum()
    }

    /// Logits of one position after a forward pass over the blocks, `out[V]`;
    /// `row` = b*T + t for the `t` of that forward pass. For generation and tests.
    pub fn head_logits(&mut self, spec: &ModelSpec, w: &[&[f32]], row: usize, out: &mut [f32]) {
        let (c, v) = (self.c, self.v);
        assert_eq!(out.len(), v);
        let x = &self.residual[spec.config.n_layer][row * c..(row + 1) * c];
        let (mut mean, mut rstd) = ([0f32], [0f32]);
        let lnf = &mut self.lnf[..c];
        layernorm_forward(lnf, &mut mean, &mut rstd, x, w[0], w[1], 1, c);
        gemm(out, v, false, Mat::rows(lnf, c), Mat::transposed(w[2], c), 1, v, c, 1.0, pool_threads());
    }

    /// Backward of layer `l` (embedding or block), after `head` or the
    /// backward of layer l+1. Accumulates into `grads` (the layer's tensors).
    /// The embedding's reads no weights: `w` may be empty there.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        spec: &ModelSpec,
        l: usize,
        w: &[&[f32]],
        grads: &mut [&mut [f32]],
        tokens: &[u32],
        b: usize,
        t: usize,
    ) {
        self.check(b, t);
        let (c, nh, bt) = (self.c, self.nh, b * t);
        let dres = &mut self.dres[..bt * c];
        match spec.layers[l].kind {
            LayerKind::Embedding => {
                let (g0, g1) = grads.split_at_mut(1);
                embedding_backward(g0[0], g1[0], dres, tokens, b, t, c);
            }
            LayerKind::Block(i) => {
                assert_eq!(w.len(), block::COUNT);
                assert_eq!(grads.len(), block::COUNT);
                let ids = &spec.layers[l].tensors;
                let x = &self.residual[i][..bt * c];
                let a = &self.blocks[i];
                let [dln1_w, dln1_b, dattn_w, dattn_b, dproj_w, dproj_b, dln2_w, dln2_b, dfc_w, dfc_b, dfcproj_w, dfcproj_b] =
                    grads
                else {
                    panic!("a block has {} tensors", block::COUNT);
                };
                // MLP projection: dres is d(out), which reaches x2 through the residual.
                let dfch = &mut self.dfch[..bt * 4 * c];
                let fch_gelu = &a.fch_gelu[..bt * 4 * c];
                linear_backward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::FCPROJ_W],
                    dfch,
                    dfcproj_w,
                    Some(dfcproj_b),
                    dres,
                    fch_gelu,
                    w[block::FCPROJ_W],
                    bt,
                    4 * c,
                    c,
                );
                gelu_backward_inplace(dfch, &a.fch[..bt * 4 * c]);
                let dln = &mut self.dln[..bt * c];
                linear_backward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::FC_W],
                    dln,
                    dfc_w,
                    Some(dfc_b),
                    dfch,
                    &a.ln2[..bt * c],
                    w[block::FC_W],
                    bt,
                    c,
                    4 * c,
                );
                let (x2, mean2, rstd2) = (&a.x2[..bt * c], &a.ln2_mean[..bt], &a.ln2_rstd[..bt]);
                layernorm_backward(dres, dln2_w, dln2_b, dln, x2, w[block::LN2_W], mean2, rstd2, bt, c);
                // Attention: dres is now d(x2), which reaches x through the residual.
                let datty = &mut self.datty[..bt * c];
                linear_backward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::PROJ_W],
                    datty,
                    dproj_w,
                    Some(dproj_b),
                    dres,
                    &a.atty[..bt * c],
                    w[block::PROJ_W],
                    bt,
                    c,
                    c,
                );
                let dqkv = &mut self.dqkv[..bt * 3 * c];
                attention_backward(dqkv, datty, &a.qkv[..bt * 3 * c], &a.att[..b * nh * t * t], b, t, c, nh);
                linear_backward(
                    self.precision,
                    &mut self.sparse,
                    ids[block::ATTN_W],
                    dln,
                    dattn_w,
                    Some(dattn_b),
                    dqkv,
                    &a.ln1[..bt * c],
                    w[block::ATTN_W],
                    bt,
                    c,
                    3 * c,
                );
                let (mean1, rstd1) = (&a.ln1_mean[..bt], &a.ln1_rstd[..bt]);
                layernorm_backward(dres, dln1_w, dln1_b, dln, x, w[block::LN1_W], mean1, rstd1, bt, c);
            }
            LayerKind::Head => panic!("the head's backward runs inside Workspace::head"),
        }
    }
}
