//! Activations on the GPU and the per-layer forward and backward passes:
//! the device twin of `ws_model::Workspace`, with the same order of calls
//! (`forward` over layers 0..L-1, `head`, `backward` over L-2..0), the same
//! weights-per-layer interface (device addresses of the layer's tensors in
//! [`ws_model::LayerSpec::tensors`] order) and the same gradient rule
//! (parameter gradients accumulate into the addresses given).
//!
//! Everything is queued on the compute stream; nothing here waits for the
//! GPU except [`GpuWorkspace::take_loss_sum`].

use crate::driver::{Batch, DevBuf, Event, GemmType, Gpu, Operand, Result};
use crate::kernels::{partial_len, token_buckets};
use ws_kernels::Precision;
use ws_model::spec::{block, LayerKind};
use ws_model::ModelSpec;

/// One block's saved activations. The inputs of its four products are kept
/// in the products' precision only: fp32 (`ln1`, `ln2`, `fch_gelu`; `atty`
/// is kept in fp32 anyway, attention's backward reads it) or bf16 (the
/// `*16` copies, written by the kernels that make them), so neither pass
/// converts them again.
struct BlockActs {
    ln1: DevBuf<f32>,
    ln1_mean: DevBuf<f32>,
    ln1_rstd: DevBuf<f32>,
    /// q, k, v in fp32 for the T x T path; empty with fused attention,
    /// which keeps them in bf16 only (`qkv16`).
    qkv: DevBuf<f32>,
    qkv16: DevBuf<u16>,
    /// The probabilities [B,NH,T,T]; with fused attention each row's
    /// log-sum-exp [B,NH,T] instead.
    att: DevBuf<f32>,
    atty: DevBuf<f32>,
    x2: DevBuf<f32>,
    ln2: DevBuf<f32>,
    ln2_mean: DevBuf<f32>,
    ln2_rstd: DevBuf<f32>,
    /// GELU's input: fp32, or bf16 (`fch16`) with bf16 products.
    fch: DevBuf<f32>,
    fch16: DevBuf<u16>,
    fch_gelu: DevBuf<f32>,
    ln1_16: DevBuf<u16>,
    atty16: DevBuf<u16>,
    ln2_16: DevBuf<u16>,
    gelu16: DevBuf<u16>,
}

impl BlockActs {
    /// The four products' inputs (LayerNorm 1, attention, LayerNorm 2,
    /// GELU) in the products' precision.
    fn inputs(&self, precision: Precision) -> [u64; 4] {
        match precision {
            Precision::Fp32 => [self.ln1.ptr(), self.atty.ptr(), self.ln2.ptr(), self.fch_gelu.ptr()],
            Precision::Bf16 => [self.ln1_16.ptr(), self.atty16.ptr(), self.ln2_16.ptr(), self.gelu16.ptr()],
        }
    }

    /// Where LayerNorm 1, LayerNorm 2 and GELU write: (fp32, bf16), one of them 0.
    fn outputs(&self, precision: Precision) -> [(u64, u64); 3] {
        match precision {
            Precision::Fp32 => [(self.ln1.ptr(), 0), (self.ln2.ptr(), 0), (self.fch_gelu.ptr(), 0)],
            Precision::Bf16 => [(0, self.ln1_16.ptr()), (0, self.ln2_16.ptr()), (0, self.gelu16.ptr())],
        }
    }
}

pub struct GpuWorkspace {
    pub b_max: usize,
    pub t_max: usize,
    c: usize,
    nh: usize,
    v: usize,
    /// Row stride of the logits: V rounded up to 64, so that the products'
    /// leading dimensions are aligned (cuBLAS ran an unaligned V = 50257
    /// at 95 TFLOP/s against 490-670 on aligned shapes, H100).
    vp: usize,
    precision: Precision,
    /// Attention by the fused kernels (no T x T matrix), see [`Self::fused_on`].
    fused: bool,
    residual: Vec<DevBuf<f32>>,
    blocks: Vec<BlockActs>,
    lnf: DevBuf<f32>,
    lnf_mean: DevBuf<f32>,
    lnf_rstd: DevBuf<f32>,
    logits: DevBuf<f32>,
    losses: DevBuf<f32>,
    loss_acc: DevBuf<f32>,
    head_rows: usize,
    tokens: DevBuf<i32>,
    targets: DevBuf<i32>,
    order: DevBuf<i32>,
    starts: DevBuf<i32>,
    uniq: DevBuf<i32>,
    n_uniq: usize,
    batch: (usize, usize),
    // Backward and attention scratch.
    dres: DevBuf<f32>,
    dln: DevBuf<f32>,
    datty: DevBuf<f32>,
    dqkv: DevBuf<f32>,
    dfch: DevBuf<f32>,
    /// bf16: the gradient of GELU's input, the FC product's operand.
    dfch16: DevBuf<u16>,
    /// bf16: the FC bias rounded, where cuBLASLt's GELU epilogue needs it so.
    bias16: DevBuf<u16>,
    q: DevBuf<f32>,
    k: DevBuf<f32>,
    vv: DevBuf<f32>,
    yh: DevBuf<f32>,
    dq: DevBuf<f32>,
    dk: DevBuf<f32>,
    dv: DevBuf<f32>,
    datt: DevBuf<f32>,
    partial: DevBuf<f32>,
    // bf16 operands of the products (empty in fp32).
    a16: DevBuf<u16>,
    b16: DevBuf<u16>,
    /// The tied embedding in bf16, [Vp, C] with zero rows past V, and the
    /// head's dwte over the padded rows: products over an aligned width.
    wte16: DevBuf<u16>,
    dwte_pad: DevBuf<f32>,
    /// Events after each phase while profiling ([`Self::start_profile`]).
    profile: std::cell::RefCell<Option<Vec<(&'static str, Event)>>>,
}

/// The output gradient a linear layer's backward starts from.
#[derive(Clone, Copy, Debug)]
enum OutGrad {
    /// Of the product's output, fp32.
    Output(u64),
    /// fp32: of GELU's output, where GELU's input `x` is the product's
    /// output; GELU's derivative is applied first.
    ThroughGelu { d: u64, x: u64 },
    /// bf16: the products' operand, made with the bias gradient by the
    /// layer above (through GELU, [`GpuWorkspace::linear_bwd`]).
    Ready16(u64),
}

/// For a product whose input came out of GELU: GELU's input (`pre`, fp32 in
/// fp32, bf16 in bf16), and in bf16 the bias gradient of the product below
/// and where the gradient of GELU's input goes (bf16).
#[derive(Clone, Copy, Debug)]
struct GeluBelow {
    pre: u64,
    dbias: u64,
    out16: u64,
}

fn head_rows_for(bt: usize) -> usize {
    bt.min(8192)
}

fn padded_vocab(v: usize) -> usize {
    v.next_multiple_of(64)
}

impl GpuWorkspace {
    /// Whether attention runs fused on `gpu`: bf16 products, a head size
    /// the fused kernels have (64, 128), sm_80 on, and the environment does
    /// not ask otherwise (`WS_CUDA_ATTENTION=materialized`, for comparisons).
    /// fp32 keeps the materialised products, exact to the CPU reference.
    pub fn fused_on(gpu: &Gpu, spec: &ModelSpec, precision: Precision) -> bool {
        let hs = spec.config.n_embd / spec.config.n_head;
        let asked = std::env::var("WS_CUDA_ATTENTION").map_or(true, |v| v != "materialized");
        precision == Precision::Bf16 && gpu.has_fused_attention(hs) && asked
    }

    /// Floats of the per-block attention buffer (probabilities, or
    /// log-sum-exps when fused) and of each of the seven per-head copies
    /// (q, k, v, y and their gradients) the T x T path works on.
    fn attention_lens(nh: usize, b: usize, t: usize, c: usize, fused: bool) -> (usize, usize) {
        if fused {
            (b * nh * t, 0)
        } else {
            (b * nh * t * t, b * t * c)
        }
    }

    /// Bytes of device memory a workspace for `b` sequences of `t` tokens takes.
    pub fn bytes_for(spec: &ModelSpec, b: usize, t: usize, precision: Precision, fused: bool) -> usize {
        let cfg = spec.config;
        let (c, nh, v, bt) = (cfg.n_embd, cfg.n_head, cfg.vocab_size, b * t);
        let (att, head) = Self::attention_lens(nh, b, t, c, fused);
        // Per token: ln1, qkv, atty, x2, ln2, fch, gelu (15 C floats) and
        // four statistics; bf16 keeps ln1, ln2, fch and gelu (10 C) as bf16
        // only, with a bf16 copy of atty (11 C halves in all), and with
        // fused attention qkv (3 C) as bf16 only too.
        let block = match (precision, fused) {
            (Precision::Fp32, _) => 4 * (bt * (15 * c + 4) + att),
            (Precision::Bf16, false) => 4 * (bt * (5 * c + 4) + att) + 2 * bt * 11 * c,
            (Precision::Bf16, true) => 4 * (bt * (2 * c + 4) + att) + 2 * bt * 14 * c,
        };
        let rows = head_rows_for(bt);
        let other = (cfg.n_layer + 1) * bt * c + bt * c + 2 * bt + rows * padded_vocab(v) + 2 * bt;
        let scratch =
            bt * c * 3 + bt * 3 * c + bt * 4 * c + 7 * head + att + partial_len(bt, 4 * c).max(partial_len(bt, 2 * c));
        // tokens, targets, order, uniq (B*T each) and starts (B*T + 1).
        let ints = 5 * bt + 1;
        let bf = match precision {
            Precision::Fp32 => 0,
            // a16, b16, wte16, dfch16 and bias16.
            Precision::Bf16 => {
                let (a16, b16) = Self::bf16_lens(spec, bt);
                a16 + b16 + padded_vocab(v) * c + (bt + 1) * 4 * c
            }
        };
        let dwte_pad = if precision == Precision::Bf16 { padded_vocab(v) * c } else { 0 };
        cfg.n_layer * block + 4 * (other + scratch + ints + dwte_pad) + 2 * bf
    }

    fn bf16_lens(spec: &ModelSpec, bt: usize) -> (usize, usize) {
        let cfg = spec.config;
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let rows = head_rows_for(bt);
        // a16: activations / output gradients; b16: weights / the other operand.
        let a = (bt * 4 * c).max(rows * padded_vocab(v));
        let b = (bt * 4 * c).max(4 * c * c).max(v * c);
        (a, b)
    }

    pub fn new(gpu: &Gpu, spec: &ModelSpec, b_max: usize, t_max: usize, precision: Precision) -> Result<GpuWorkspace> {
        let cfg = spec.config;
        assert!(t_max <= cfg.block_size, "sequence {t_max} longer than block_size {}", cfg.block_size);
        let (c, nh, v) = (cfg.n_embd, cfg.n_head, cfg.vocab_size);
        let bt = b_max * t_max;
        let fused = Self::fused_on(gpu, spec, precision);
        let (att, head) = Self::attention_lens(nh, b_max, t_max, c, fused);
        let f = |n: usize| gpu.zeros::<f32>(n);
        let bf = precision == Precision::Bf16;
        // Kept in one precision only (see BlockActs).
        let f32_only = |n: usize| gpu.zeros::<f32>(if bf { 0 } else { n });
        let bf16_only = |n: usize| gpu.zeros::<u16>(if bf { n } else { 0 });
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            blocks.push(BlockActs {
                ln1: f32_only(bt * c)?,
                ln1_mean: f(bt)?,
                ln1_rstd: f(bt)?,
                qkv: f(if fused { 0 } else { bt * 3 * c })?,
                qkv16: gpu.zeros::<u16>(if fused { bt * 3 * c } else { 0 })?,
                att: f(att)?,
                atty: f(bt * c)?,
                x2: f(bt * c)?,
                ln2: f32_only(bt * c)?,
                ln2_mean: f(bt)?,
                ln2_rstd: f(bt)?,
                fch: f32_only(bt * 4 * c)?,
                fch16: bf16_only(bt * 4 * c)?,
                fch_gelu: f32_only(bt * 4 * c)?,
                ln1_16: bf16_only(bt * c)?,
                atty16: bf16_only(bt * c)?,
                ln2_16: bf16_only(bt * c)?,
                gelu16: bf16_only(bt * 4 * c)?,
            });
        }
        let head_rows = head_rows_for(bt);
        let (a16, b16) = match precision {
            Precision::Fp32 => (0, 0),
            Precision::Bf16 => Self::bf16_lens(spec, bt),
        };
        Ok(GpuWorkspace {
            b_max,
            t_max,
            c,
            nh,
            v,
            vp: padded_vocab(v),
            precision,
            fused,
            residual: (0..=cfg.n_layer).map(|_| f(bt * c)).collect::<Result<_>>()?,
            blocks,
            lnf: f(bt * c)?,
            lnf_mean: f(bt)?,
            lnf_rstd: f(bt)?,
            logits: f(head_rows * padded_vocab(v))?,
            losses: f(bt)?,
            loss_acc: f(bt)?,
            head_rows,
            tokens: gpu.zeros(bt)?,
            targets: gpu.zeros(bt)?,
            order: gpu.zeros(bt)?,
            starts: gpu.zeros(bt + 1)?,
            uniq: gpu.zeros(bt)?,
            n_uniq: 0,
            batch: (0, 0),
            dres: f(bt * c)?,
            dln: f(bt * c)?,
            datty: f(bt * c)?,
            dqkv: f(bt * 3 * c)?,
            dfch: f(bt * 4 * c)?,
            dfch16: bf16_only(bt * 4 * c)?,
            bias16: bf16_only(4 * c)?,
            q: f(head)?,
            k: f(head)?,
            vv: f(head)?,
            yh: f(head)?,
            dq: f(head)?,
            dk: f(head)?,
            dv: f(head)?,
            datt: f(att)?,
            partial: f(partial_len(bt, 4 * c).max(partial_len(bt, 2 * c)))?,
            a16: gpu.zeros(a16)?,
            b16: gpu.zeros(b16)?,
            wte16: gpu.zeros(if precision == Precision::Bf16 { padded_vocab(v) * c } else { 0 })?,
            dwte_pad: gpu.zeros(if precision == Precision::Bf16 { padded_vocab(v) * c } else { 0 })?,
            profile: std::cell::RefCell::new(None),
        })
    }

    /// Starts timing phases (linear products, attention, LayerNorm, ...)
    /// with events on the compute stream, for one step or a few.
    pub fn start_profile(&self, gpu: &Gpu) -> Result<()> {
        let e = Event::new(true)?;
        e.record(&gpu.compute)?;
        *self.profile.borrow_mut() = Some(vec![("start", e)]);
        Ok(())
    }

    /// Marks the end of a phase while profiling.
    pub fn mark(&self, gpu: &Gpu, phase: &'static str) -> Result<()> {
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            let e = Event::new(true)?;
            e.record(&gpu.compute)?;
            p.push((phase, e));
        }
        Ok(())
    }

    /// Milliseconds per phase since [`Self::start_profile`] (waits for the
    /// GPU), in order of first appearance; profiling stops.
    pub fn finish_profile(&self) -> Result<Vec<(&'static str, f64)>> {
        let Some(marks) = self.profile.borrow_mut().take() else { return Ok(Vec::new()) };
        marks.last().expect("start").1.synchronize()?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for w in marks.windows(2) {
            let ms = w[1].1.elapsed_ms(&w[0].1)? as f64;
            match out.iter_mut().find(|(n, _)| *n == w[1].0) {
                Some(e) => e.1 += ms,
                None => out.push((w[1].0, ms)),
            }
        }
        Ok(out)
    }

    /// Uploads a micro-batch's tokens and targets (B*T each; targets may be
    /// empty for a forward pass only) and groups positions by token for the
    /// embedding's backward.
    pub fn set_batch(&mut self, gpu: &Gpu, tokens: &[u32], targets: &[u32], b: usize, t: usize) -> Result<()> {
        assert!(b >= 1 && b <= self.b_max && t >= 1 && t <= self.t_max, "batch {b}x{t} outside the workspace");
        assert_eq!(tokens.len(), b * t);
        let s = &gpu.compute;
        let toks: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
        gpu.upload(self.tokens.ptr(), &toks, s)?;
        if !targets.is_empty() {
            assert_eq!(targets.len(), b * t);
            let tg: Vec<i32> = targets.iter().map(|&x| x as i32).collect();
            gpu.upload(self.targets.ptr(), &tg, s)?;
        }
        let (order, starts, uniq) = token_buckets(tokens);
        gpu.upload(self.order.ptr(), &order, s)?;
        gpu.upload(self.starts.ptr(), &starts, s)?;
        gpu.upload(self.uniq.ptr(), &uniq, s)?;
        self.n_uniq = uniq.len();
        self.batch = (b, t);
        Ok(())
    }

    /// A layer's fp32 weight matrix (`len` floats at `w`) rounded to bf16
    /// into `b16`, the products' operand; returns its address.
    fn weights16(&self, gpu: &Gpu, w: u64, len: usize) -> Result<u64> {
        gpu.to_bf16(&gpu.compute, self.b16.ptr(), w, len)?;
        Ok(self.b16.ptr())
    }

    /// `out[bt,n] = inp[bt,k] @ w[k,n] + bias (+ residual[bt,n])`; `inp` in
    /// the products' precision (bf16 already rounded, see [`BlockActs`]).
    /// The residual is added in the product's epilogue where cuBLASLt runs it.
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(
        &self,
        gpu: &Gpu,
        out: u64,
        inp: u64,
        w: u64,
        bias: u64,
        residual: Option<u64>,
        bt: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let o = Operand::n(out, n);
        match self.precision {
            Precision::Fp32 => {
                let (a, b) = (Operand::n(inp, k), Operand::n(w, n));
                gpu.gemm_bias(GemmType::F32, bt, n, k, a, b, bias, residual, o)
            }
            Precision::Bf16 => {
                let (a, b) = (Operand::n(inp, k), Operand::n(self.weights16(gpu, w, k * n)?, n));
                gpu.gemm_bias(GemmType::Bf16, bt, n, k, a, b, bias, residual, o)
            }
        }?;
        self.mark(gpu, "linear fwd")
    }

    /// `dinp = dout @ w^T` (overwrites), `dw += inp^T @ dout`, `dbias +=
    /// colsum(dout)`; `inp` in the products' precision, as in [`Self::linear_fwd`].
    /// With `gelu` (bf16), the product's input came out of GELU: `dinp` is
    /// then the gradient of GELU's input, in bf16 at `gelu.out16`, with its
    /// bias gradient, and what the layer below starts from is returned.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        gpu: &Gpu,
        dinp: u64,
        dw: u64,
        dbias: u64,
        dout: OutGrad,
        inp: u64,
        w: u64,
        bt: usize,
        k: usize,
        n: usize,
        gelu: Option<GeluBelow>,
    ) -> Result<OutGrad> {
        let s = &gpu.compute;
        let partial = self.partial.ptr();
        let dout = match (dout, self.precision) {
            (OutGrad::Output(d), Precision::Fp32) => {
                gpu.bias_bwd(s, dbias, partial, d, bt, n)?;
                d
            }
            (OutGrad::ThroughGelu { d, x }, Precision::Fp32) => {
                gpu.gelu_bwd(s, d, x, bt * n)?;
                self.mark(gpu, "gelu")?;
                gpu.bias_bwd(s, dbias, partial, d, bt, n)?;
                d
            }
            // bf16: one pass makes the bias gradient and the products'
            // bf16 operand (a16).
            (OutGrad::Output(d), Precision::Bf16) => {
                gpu.bias_bwd_cast(s, dbias, partial, (0, self.a16.ptr()), d, bt, n)?;
                self.a16.ptr()
            }
            // Made by the layer above's product, bias gradient included.
            (OutGrad::Ready16(d16), Precision::Bf16) => d16,
            (dout, p) => unreachable!("{dout:?} in {}", p.name()),
        };
        let next = match self.precision {
            Precision::Fp32 => {
                gpu.gemm(
                    GemmType::F32,
                    bt,
                    k,
                    n,
                    1.0,
                    Operand::n(dout, n),
                    Operand::t(w, n),
                    0.0,
                    Operand::n(dinp, k),
                    None,
                )?;
                gpu.gemm(
                    GemmType::F32,
                    k,
                    n,
                    bt,
                    1.0,
                    Operand::t(inp, k),
                    Operand::n(dout, n),
                    1.0,
                    Operand::n(dw, n),
                    None,
                )?;
                match gelu {
                    Some(g) => OutGrad::ThroughGelu { d: dinp, x: g.pre },
                    None => OutGrad::Output(dinp),
                }
            }
            Precision::Bf16 => {
                let (d, wt) = (Operand::n(dout, n), Operand::t(self.weights16(gpu, w, k * n)?, n));
                let next = match gelu {
                    Some(g) => {
                        gpu.gemm_dgelu(bt, k, n, d, wt, g.pre, (g.dbias, partial), g.out16, dinp)?;
                        OutGrad::Ready16(g.out16)
                    }
                    None => {
                        gpu.gemm(GemmType::Bf16, bt, k, n, 1.0, d, wt, 0.0, Operand::n(dinp, k), None)?;
                        OutGrad::Output(dinp)
                    }
                };
                gpu.gemm(GemmType::Bf16, k, n, bt, 1.0, Operand::t(inp, k), d, 1.0, Operand::n(dw, n), None)?;
                next
            }
        };
        self.mark(gpu, "linear bwd")?;
        Ok(next)
    }

    fn attn_gemm_type(&self) -> GemmType {
        match self.precision {
            Precision::Fp32 => GemmType::F32,
            Precision::Bf16 => GemmType::Tf32,
        }
    }

    /// Forward of layer `l` (embedding or block) on the batch of [`Self::set_batch`].
    pub fn forward(&mut self, gpu: &Gpu, spec: &ModelSpec, l: usize, w: &[u64]) -> Result<()> {
        let (b, t) = self.batch;
        let (c, bt) = (self.c, b * t);
        let s = &gpu.compute;
        match spec.layers[l].kind {
            LayerKind::Embedding => {
                assert_eq!(w.len(), 2);
                gpu.embedding_fwd(s, self.residual[0].ptr(), self.tokens.ptr(), w[0], w[1], bt, t, c)?;
                self.mark(gpu, "embedding")
            }
            LayerKind::Block(i) => {
                assert_eq!(w.len(), block::COUNT);
                let x = self.residual[i].ptr();
                let out = self.residual[i + 1].ptr();
                let a = &self.blocks[i];
                let p = self.precision;
                let [ln1_out, ln2_out, gelu_out] = a.outputs(p);
                gpu.layernorm_fwd(
                    s,
                    ln1_out,
                    a.ln1_mean.ptr(),
                    a.ln1_rstd.ptr(),
                    x,
                    w[block::LN1_W],
                    w[block::LN1_B],
                    bt,
                    c,
                )?;
                self.mark(gpu, "layernorm")?;
                let [ln1_in, atty_in, ln2_in, gelu_in] = a.inputs(p);
                // Fused attention keeps q, k, v in bf16 only: the product's
                // fp32 output goes to scratch (dqkv, free in the forward).
                let qkv = if self.fused { self.dqkv.ptr() } else { a.qkv.ptr() };
                self.linear_fwd(gpu, qkv, ln1_in, w[block::ATTN_W], w[block::ATTN_B], None, bt, c, 3 * c)?;
                self.attention_fwd(gpu, i, qkv, b, t)?;
                let a = &self.blocks[i];
                if p == Precision::Bf16 && !self.fused {
                    gpu.to_bf16(s, a.atty16.ptr(), a.atty.ptr(), bt * c)?;
                }
                let (pw, pb) = (w[block::PROJ_W], w[block::PROJ_B]);
                self.linear_fwd(gpu, a.x2.ptr(), atty_in, pw, pb, Some(x), bt, c, c)?;
                gpu.layernorm_fwd(
                    s,
                    ln2_out,
                    a.ln2_mean.ptr(),
                    a.ln2_rstd.ptr(),
                    a.x2.ptr(),
                    w[block::LN2_W],
                    w[block::LN2_B],
                    bt,
                    c,
                )?;
                self.mark(gpu, "layernorm")?;
                let (fw, fb) = (w[block::FC_W], w[block::FC_B]);
                match p {
                    Precision::Fp32 => {
                        self.linear_fwd(gpu, a.fch.ptr(), ln2_in, fw, fb, None, bt, c, 4 * c)?;
                        gpu.gelu_fwd(s, (gelu_out.0, gelu_out.1, 0), a.fch.ptr(), bt * 4 * c)?;
                        self.mark(gpu, "gelu")?;
                    }
                    // GELU in the product's epilogue, its input kept in bf16
                    // (the fp32 scratch only where cuBLASLt cannot).
                    Precision::Bf16 => {
                        let (x, wo) = (Operand::n(ln2_in, c), Operand::n(self.weights16(gpu, fw, c * 4 * c)?, 4 * c));
                        let out = (a.gelu16.ptr(), a.fch16.ptr());
                        let bias = (fb, self.bias16.ptr());
                        gpu.gemm_bias_gelu(bt, 4 * c, c, x, wo, bias, out, self.dfch.ptr())?;
                        self.mark(gpu, "linear fwd")?;
                    }
                }
                let (pw, pb) = (w[block::FCPROJ_W], w[block::FCPROJ_B]);
                self.linear_fwd(gpu, out, gelu_in, pw, pb, Some(a.x2.ptr()), bt, 4 * c, c)
            }
            LayerKind::Head => panic!("the head runs through GpuWorkspace::head"),
        }
    }

    /// Whether attention runs through the fused kernels.
    pub fn fused_attention(&self) -> bool {
        self.fused
    }

    /// Attention of block `i` over `qkv` (fp32, the product's output); fused,
    /// it writes the block's atty and its bf16 copy, and keeps qkv in bf16.
    fn attention_fwd(&self, gpu: &Gpu, i: usize, qkv: u64, b: usize, t: usize) -> Result<()> {
        let (c, nh) = (self.c, self.nh);
        let hs = c / nh;
        let s = &gpu.compute;
        let a = &self.blocks[i];
        if self.fused {
            let y = (a.atty.ptr(), a.atty16.ptr());
            gpu.fused_attention_fwd(s, y, a.att.ptr(), qkv, a.qkv16.ptr(), b, t, nh, hs)?;
            return self.mark(gpu, "attention fwd");
        }
        let (q, k, v, yh) = (self.q.ptr(), self.k.ptr(), self.vv.ptr(), self.yh.ptr());
        gpu.split_heads(s, q, qkv, b, t, nh, hs, 3 * c, 0)?;
        gpu.split_heads(s, k, qkv, b, t, nh, hs, 3 * c, c)?;
        gpu.split_heads(s, v, qkv, b, t, nh, hs, 3 * c, 2 * c)?;
        let z = b * nh;
        let ty = self.attn_gemm_type();
        let att = a.att.ptr();
        // scores[T,T] = q[T,HS] k[T,HS]^T, per (batch, head)
        let bat = Batch { count: z, a: t * hs, b: t * hs, c: t * t };
        gpu.gemm(ty, t, t, hs, 1.0, Operand::n(q, hs), Operand::t(k, hs), 0.0, Operand::n(att, t), Some(bat))?;
        gpu.softmax_causal_fwd(s, att, z * t, t, 1.0 / (hs as f32).sqrt())?;
        // y[T,HS] = att[T,T] v[T,HS]
        let bat = Batch { count: z, a: t * t, b: t * hs, c: t * hs };
        gpu.gemm(ty, t, hs, t, 1.0, Operand::n(att, t), Operand::n(v, hs), 0.0, Operand::n(yh, hs), Some(bat))?;
        gpu.merge_heads(s, a.atty.ptr(), yh, b, t, nh, hs, c, 0)?;
        self.mark(gpu, "attention fwd")
    }

    fn attention_bwd(&self, gpu: &Gpu, i: usize, b: usize, t: usize) -> Result<()> {
        let (c, nh) = (self.c, self.nh);
        let hs = c / nh;
        let s = &gpu.compute;
        let a = &self.blocks[i];
        if self.fused {
            let (dqkv, dy) = (self.dqkv.ptr(), self.datty.ptr());
            let scratch = (self.datt.ptr(), self.b16.ptr());
            gpu.fused_attention_bwd(s, dqkv, a.qkv16.ptr(), a.atty.ptr(), dy, a.att.ptr(), scratch, b, t, nh, hs)?;
            return self.mark(gpu, "attention bwd");
        }
        let (q, k, v, dyh) = (self.q.ptr(), self.k.ptr(), self.vv.ptr(), self.yh.ptr());
        gpu.split_heads(s, q, a.qkv.ptr(), b, t, nh, hs, 3 * c, 0)?;
        gpu.split_heads(s, k, a.qkv.ptr(), b, t, nh, hs, 3 * c, c)?;
        gpu.split_heads(s, v, a.qkv.ptr(), b, t, nh, hs, 3 * c, 2 * c)?;
        gpu.split_heads(s, dyh, self.datty.ptr(), b, t, nh, hs, c, 0)?;
        let z = b * nh;
        let ty = self.attn_gemm_type();
        let (att, datt) = (a.att.ptr(), self.datt.ptr());
        let (dq, dk, dv) = (self.dq.ptr(), self.dk.ptr(), self.dv.ptr());
        // datt[T,T] = dy[T,HS] v^T
        let bat = Batch { count: z, a: t * hs, b: t * hs, c: t * t };
        gpu.gemm(ty, t, t, hs, 1.0, Operand::n(dyh, hs), Operand::t(v, hs), 0.0, Operand::n(datt, t), Some(bat))?;
        // dv[T,HS] = att^T dy
        let bat = Batch { count: z, a: t * t, b: t * hs, c: t * hs };
        gpu.gemm(ty, t, hs, t, 1.0, Operand::t(att, t), Operand::n(dyh, hs), 0.0, Operand::n(dv, hs), Some(bat))?;
        gpu.softmax_causal_bwd(s, datt, att, z * t, t, 1.0 / (hs as f32).sqrt())?;
        // dq = dscores k ; dk = dscores^T q
        gpu.gemm(ty, t, hs, t, 1.0, Operand::n(datt, t), Operand::n(k, hs), 0.0, Operand::n(dq, hs), Some(bat))?;
        gpu.gemm(ty, t, hs, t, 1.0, Operand::t(datt, t), Operand::n(q, hs), 0.0, Operand::n(dk, hs), Some(bat))?;
        let dqkv = self.dqkv.ptr();
        gpu.merge_heads(s, dqkv, dq, b, t, nh, hs, 3 * c, 0)?;
        gpu.merge_heads(s, dqkv, dk, b, t, nh, hs, 3 * c, c)?;
        gpu.merge_heads(s, dqkv, dv, b, t, nh, hs, 3 * c, 2 * c)?;
        self.mark(gpu, "attention bwd")
    }

    /// The head: final LayerNorm, logits against the tied embedding,
    /// cross-entropy. Per-position losses are added to a device accumulator
    /// ([`Self::take_loss_sum`]). With `grads` (ln_f weight, ln_f bias, wte),
    /// also the head's backward with the loss scaled by `dloss_scale`.
    pub fn head(
        &mut self,
        gpu: &Gpu,
        spec: &ModelSpec,
        w: &[u64],
        grads: Option<&[u64]>,
        dloss_scale: f32,
    ) -> Result<()> {
        assert_eq!(w.len(), 3);
        let (b, t) = self.batch;
        let (c, v, bt) = (self.c, self.v, b * t);
        let s = &gpu.compute;
        let x = self.residual[spec.config.n_layer].ptr();
        let lnf = self.lnf.ptr();
        gpu.layernorm_fwd(s, (lnf, 0), self.lnf_mean.ptr(), self.lnf_rstd.ptr(), x, w[0], w[1], bt, c)?;
        self.mark(gpu, "layernorm")?;
        let bf = self.precision == Precision::Bf16;
        let wte = w[2];
        // bf16: products over the padded vocabulary (zero rows of wte16
        // past V give zero logits, whose gradient the cross-entropy zeroes).
        let (wte_op, ty, n_out) = if bf {
            gpu.to_bf16(s, self.wte16.ptr(), wte, v * c)?;
            (self.wte16.ptr(), GemmType::Bf16, self.vp)
        } else {
            (wte, GemmType::F32, v)
        };
        let dlnf = self.dln.ptr();
        let vp = self.vp;
        for r0 in (0..bt).step_by(self.head_rows) {
            let rows = (r0 + self.head_rows).min(bt) - r0;
            let logits = self.logits.ptr();
            let x_rows = self.lnf.at(r0 * c);
            let x_op = if bf {
                gpu.to_bf16(s, self.a16.ptr(), x_rows, rows * c)?;
                self.a16.ptr()
            } else {
                x_rows
            };
            let (xo, wo, lo) = (Operand::n(x_op, c), Operand::t(wte_op, c), Operand::n(logits, vp));
            gpu.gemm(ty, rows, n_out, c, 1.0, xo, wo, 0.0, lo, None)?;
            self.mark(gpu, "head products")?;
            let scale = grads.map(|_| dloss_scale);
            // bf16: the cross-entropy writes dlogits in bf16 into a16 (the
            // rows' bf16 copy there is no longer needed).
            let d16 = if bf && grads.is_some() { self.a16.ptr() } else { 0 };
            let (losses, targets) = (self.losses.at(r0), self.targets.at(r0));
            gpu.crossentropy(s, losses, logits, d16, targets, rows, v, vp, scale)?;
            self.mark(gpu, "cross-entropy")?;
            if let Some(g) = grads {
                let dx_rows = self.dln.at(r0 * c);
                if bf {
                    // a16: dlogits in bf16; b16: the rows in bf16; dwte over
                    // the padded rows into dwte_pad, added to the gradient below.
                    let (dl, w16, dx) = (Operand::n(d16, vp), Operand::n(wte_op, c), Operand::n(dx_rows, c));
                    gpu.gemm(ty, rows, c, vp, 1.0, dl, w16, 0.0, dx, None)?;
                    self.mark(gpu, "head products")?;
                    gpu.to_bf16(s, self.b16.ptr(), x_rows, rows * c)?;
                    let (dlt, x16, dw) =
                        (Operand::t(d16, vp), Operand::n(self.b16.ptr(), c), Operand::n(self.dwte_pad.ptr(), c));
                    let beta = if r0 == 0 { 0.0 } else { 1.0 };
                    gpu.gemm(ty, vp, c, rows, 1.0, dlt, x16, beta, dw, None)?;
                    self.mark(gpu, "head products")?;
                    if r0 + rows == bt {
                        gpu.add_inplace(s, g[2], self.dwte_pad.ptr(), v * c)?;
                        self.mark(gpu, "head products")?;
                    }
                } else {
                    gpu.gemm(
                        ty,
                        rows,
                        c,
                        v,
                        1.0,
                        Operand::n(logits, vp),
                        Operand::n(wte, c),
                        0.0,
                        Operand::n(dx_rows, c),
                        None,
                    )?;
                    gpu.gemm(
                        ty,
                        v,
                        c,
                        rows,
                        1.0,
                        Operand::t(logits, vp),
                        Operand::n(x_rows, c),
                        1.0,
                        Operand::n(g[2], c),
                        None,
                    )?;
                    self.mark(gpu, "head products")?;
                }
            }
        }
        gpu.add_inplace(s, self.loss_acc.ptr(), self.losses.ptr(), bt)?;
        self.mark(gpu, "cross-entropy")?;
        if let Some(g) = grads {
            let dres = self.dres.ptr();
            gpu.memset_zero(dres, bt * c * 4, s)?;
            let (mean, rstd) = (self.lnf_mean.ptr(), self.lnf_rstd.ptr());
            gpu.layernorm_bwd(s, dres, g[0], g[1], self.partial.ptr(), dlnf, x, w[0], mean, rstd, bt, c)?;
            self.mark(gpu, "layernorm")?;
        }
        Ok(())
    }

    /// Sum of the per-position losses of every `head` call since the last
    /// take (waits for the compute stream), and resets the accumulator.
    pub fn take_loss_sum(&mut self, gpu: &Gpu) -> Result<f64> {
        let n = self.b_max * self.t_max;
        let mut host = vec![0f32; n];
        gpu.download(&mut host, self.loss_acc.ptr(), &gpu.compute)?;
        gpu.memset_zero(self.loss_acc.ptr(), n * 4, &gpu.compute)?;
        Ok(host.iter().map(|&x| x as f64).sum())
    }

    /// Backward of layer `l` (embedding or block), after `head` or the
    /// backward of layer l+1; accumulates into `grads` (the layer's tensors).
    pub fn backward(&mut self, gpu: &Gpu, spec: &ModelSpec, l: usize, w: &[u64], grads: &[u64]) -> Result<()> {
        let (b, t) = self.batch;
        let (c, bt) = (self.c, b * t);
        let s = &gpu.compute;
        let dres = self.dres.ptr();
        match spec.layers[l].kind {
            LayerKind::Embedding => {
                let buckets = (self.order.ptr(), self.starts.ptr(), self.uniq.ptr(), self.n_uniq);
                gpu.embedding_bwd(s, grads[0], grads[1], dres, buckets, b, t, c)?;
                self.mark(gpu, "embedding")
            }
            LayerKind::Block(i) => {
                assert_eq!(w.len(), block::COUNT);
                assert_eq!(grads.len(), block::COUNT);
                let x = self.residual[i].ptr();
                let a = &self.blocks[i];
                let [ln1_in, atty_in, ln2_in, gelu_in] = a.inputs(self.precision);
                let g = grads;
                let (dfch, dln, datty) = (self.dfch.ptr(), self.dln.ptr(), self.datty.ptr());
                let pre = match self.precision {
                    Precision::Fp32 => a.fch.ptr(),
                    Precision::Bf16 => a.fch16.ptr(),
                };
                let below = GeluBelow { pre, dbias: g[block::FC_B], out16: self.dfch16.ptr() };
                let dgelu = self.linear_bwd(
                    gpu,
                    dfch,
                    g[block::FCPROJ_W],
                    g[block::FCPROJ_B],
                    OutGrad::Output(dres),
                    gelu_in,
                    w[block::FCPROJ_W],
                    bt,
                    4 * c,
                    c,
                    Some(below),
                )?;
                let (fw, fb) = (g[block::FC_W], g[block::FC_B]);
                self.linear_bwd(gpu, dln, fw, fb, dgelu, ln2_in, w[block::FC_W], bt, c, 4 * c, None)?;
                let p = self.partial.ptr();
                let (m2, r2) = (a.ln2_mean.ptr(), a.ln2_rstd.ptr());
                gpu.layernorm_bwd(
                    s,
                    dres,
                    g[block::LN2_W],
                    g[block::LN2_B],
                    p,
                    dln,
                    a.x2.ptr(),
                    w[block::LN2_W],
                    m2,
                    r2,
                    bt,
                    c,
                )?;
                self.mark(gpu, "layernorm")?;
                self.linear_bwd(
                    gpu,
                    datty,
                    g[block::PROJ_W],
                    g[block::PROJ_B],
                    OutGrad::Output(dres),
                    atty_in,
                    w[block::PROJ_W],
                    bt,
                    c,
                    c,
                    None,
                )?;
                self.attention_bwd(gpu, i, b, t)?;
                let a = &self.blocks[i];
                let dqkv = self.dqkv.ptr();
                self.linear_bwd(
                    gpu,
                    dln,
                    g[block::ATTN_W],
                    g[block::ATTN_B],
                    OutGrad::Output(dqkv),
                    ln1_in,
                    w[block::ATTN_W],
                    bt,
                    c,
                    3 * c,
                    None,
                )?;
                let (m1, r1) = (a.ln1_mean.ptr(), a.ln1_rstd.ptr());
                gpu.layernorm_bwd(
                    s,
                    dres,
                    g[block::LN1_W],
                    g[block::LN1_B],
                    p,
                    dln,
                    x,
                    w[block::LN1_W],
                    m1,
                    r1,
                    bt,
                    c,
                )?;
                self.mark(gpu, "layernorm")
            }
            LayerKind::Head => panic!("the head's backward runs inside GpuWorkspace::head"),
        }
    }
}
