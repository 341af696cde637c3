//! Our CUDA C kernels (`kernels.cu`): compiled by NVRTC for the device's
//! architecture when a [`Gpu`] starts, and typed launchers for each.
//!
//! Each launcher mirrors a CPU kernel of `ws-kernels` (same arguments, same
//! accumulate/overwrite rule) and is tested against it.

use crate::driver::{check, cname, Arg, Gpu, GpuError, Result, Stream};
use cudarc::driver::sys as cu;

/// The kernel source, for checks that compile it without a GPU.
pub const SOURCE: &str = include_str!("kernels.cu");

const THREADS: u32 = 256;
/// Threads of a fused attention block: 4 warps of 16 rows (`FA_THREADS`).
const FUSED_THREADS: u32 = 128;

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        pub(crate) struct Kernels {
            $(pub(crate) $name: cu::CUfunction,)*
            _module: cu::CUmodule,
        }

        impl Kernels {
            /// Every kernel name in the source.
            #[allow(dead_code)]
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),*];

            fn from_module(module: cu::CUmodule) -> Result<Kernels> {
                Ok(Kernels {
                    $($name: {
                        let mut f = std::ptr::null_mut();
                        let n = cname(stringify!($name));
                        // SAFETY: a loaded module and a NUL-terminated name.
                        check(unsafe { cu::cuModuleGetFunction(&mut f, module, n.as_ptr()) },
                              concat!("cuModuleGetFunction ", stringify!($name)))?;
                        f
                    },)*
                    _module: module,
                })
            }
        }
    };
}

kernels!(
    embedding_fwd,
    embedding_bwd_wte,
    embedding_bwd_wpe,
    layernorm_fwd,
    layernorm_fwd_1,
    layernorm_fwd_2,
    layernorm_fwd_4,
    layernorm_fwd_6,
    layernorm_fwd_8,
    layernorm_bwd_1,
    layernorm_bwd_2,
    layernorm_bwd_4,
    layernorm_bwd_6,
    layernorm_bwd_8,
    layernorm_bwd_dx,
    layernorm_param_partial,
    column_partial,
    sum_partials,
    gelu_fwd,
    gelu_bwd,
    add_inplace,
    bias_fill,
    to_bf16,
    from_bf16,
    split_heads,
    merge_heads,
    softmax_causal_fwd,
    softmax_causal_bwd,
    flash_fwd_64,
    flash_fwd_128,
    flash_bwd_dvec,
    flash_dq_64,
    flash_dq_128,
    flash_dkdv_64,
    flash_dkdv_128,
    crossentropy,
    adamw,
    sumsq_partial,
);

/// Compiles [`SOURCE`] to PTX for `compute_XY`; the error carries NVRTC's log.
pub fn compile(cc: (i32, i32)) -> Result<String> {
    let arch: &'static str = Box::leak(format!("compute_{}{}", cc.0, cc.1).into_boxed_str());
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some("kernels.cu".into()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| GpuError(format!("NVRTC could not compile kernels.cu: {e:?}")))?;
    Ok(ptx.to_src())
}

impl Kernels {
    /// Compiles and loads the kernels; `smem_optin` is the most dynamic
    /// shared memory a block may ask for on this GPU.
    pub(crate) fn load(cc: (i32, i32), smem_optin: usize) -> Result<Kernels> {
        let ptx = compile(cc)?;
        let src = std::ffi::CString::new(ptx).map_err(|_| GpuError("PTX with a NUL byte".into()))?;
        let mut module = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX text.
        check(unsafe { cu::cuModuleLoadData(&mut module, src.as_ptr() as *const _) }, "cuModuleLoadData")?;
        let k = Kernels::from_module(module)?;
        if fused_attention_arch(cc) {
            let attr = cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            for hs in [64, 128] {
                let f = k.fused(hs).expect("64 and 128 have kernels");
                if !f.smem.fits(smem_optin) {
                    continue;
                }
                for (func, bytes) in [(f.fwd, f.smem.fwd), (f.dq, f.smem.dq), (f.dkdv, f.smem.dkdv)] {
                    // SAFETY: a function of the loaded module; shared memory above
                    // 48 KiB must be asked for before the launch (sm_80: 163 KiB).
                    check(unsafe { cu::cuFuncSetAttribute(func, attr, bytes as i32) }, "cuFuncSetAttribute")?;
                }
            }
        }
        Ok(k)
    }

    /// The LayerNorm kernels (forward, backward) for `c` channels read as
    /// float4 per lane (`c` = 128 V), where there are some.
    fn layernorm_vec(&self, c: usize) -> Option<(cu::CUfunction, cu::CUfunction)> {
        if !c.is_multiple_of(128) {
            return None;
        }
        Some(match c / 128 {
            1 => (self.layernorm_fwd_1, self.layernorm_bwd_1),
            2 => (self.layernorm_fwd_2, self.layernorm_bwd_2),
            4 => (self.layernorm_fwd_4, self.layernorm_bwd_4),
            6 => (self.layernorm_fwd_6, self.layernorm_bwd_6),
            8 => (self.layernorm_fwd_8, self.layernorm_bwd_8),
            _ => return None,
        })
    }

    /// The fused attention kernels for head size `hs`, where there are some.
    fn fused(&self, hs: usize) -> Option<Fused> {
        let smem = FusedSmem::for_head(hs)?;
        Some(match hs {
            64 => Fused { fwd: self.flash_fwd_64, dq: self.flash_dq_64, dkdv: self.flash_dkdv_64, smem },
            _ => Fused { fwd: self.flash_fwd_128, dq: self.flash_dq_128, dkdv: self.flash_dkdv_128, smem },
        })
    }
}

/// Whether the tensor-core instructions of the fused attention exist (sm_80 on).
fn fused_attention_arch(cc: (i32, i32)) -> bool {
    cc.0 >= 8
}

struct Fused {
    fwd: cu::CUfunction,
    dq: cu::CUfunction,
    dkdv: cu::CUfunction,
    smem: FusedSmem,
}

/// Dynamic shared memory of the fused attention kernels: `FaSmem` in kernels.cu.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FusedSmem {
    fwd: usize,
    dq: usize,
    dkdv: usize,
}

impl FusedSmem {
    const TILE: usize = 64;

    /// Whether all three kernels fit `optin` bytes per block (sm_80 and
    /// sm_90 allow 163 and 227 KiB; sm_86, sm_89 and sm_120 only 99 KiB).
    fn fits(&self, optin: usize) -> bool {
        self.fwd.max(self.dq).max(self.dkdv) <= optin
    }

    fn for_head(hs: usize) -> Option<FusedSmem> {
        if hs != 64 && hs != 128 {
            return None;
        }
        let ld = hs + 8;
        let bq = if hs == 64 { 64 } else { 32 };
        let tile = Self::TILE * ld;
        Some(FusedSmem { fwd: 5 * tile * 2, dq: 6 * tile * 2, dkdv: (2 * tile + 4 * bq * ld) * 2 + 4 * bq * 4 })
    }
}

fn blocks(n: usize) -> u32 {
    u32::try_from(n.div_ceil(THREADS as usize)).expect("grid fits u32")
}

fn i(x: usize) -> Arg {
    Arg::I(i32::try_from(x).unwrap_or_else(|_| panic!("{x} does not fit a 32-bit kernel argument")))
}

fn l(x: usize) -> Arg {
    Arg::L(x as i64)
}

/// Rows per block for the column-sum kernels: at most 256 blocks of rows.
fn column_chunk(rows: usize) -> usize {
    rows.div_ceil(256).max(32)
}

/// Floats of scratch the column sums need for `rows` x `cols`.
pub fn partial_len(rows: usize, cols: usize) -> usize {
    rows.div_ceil(column_chunk(rows)) * cols
}

/// Launchers. Pointers are device addresses (`DevBuf::ptr`/`at`); every
/// launch is queued on `s`.
impl Gpu {
    pub fn embedding_fwd(
        &self,
        s: &Stream,
        out: u64,
        tokens: u64,
        wte: u64,
        wpe: u64,
        bt: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let k = self.kernels.embedding_fwd;
        self.launch(
            k,
            (blocks(bt * c), 1),
            (THREADS, 1),
            s,
            &[Arg::P(out), Arg::P(tokens), Arg::P(wte), Arg::P(wpe), i(bt), i(t), i(c)],
        )
    }

    /// dwte += per-token sums; `order`, `starts`, `uniq` from [`token_buckets`].
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_bwd(
        &self,
        s: &Stream,
        dwte: u64,
        dwpe: u64,
        dout: u64,
        buckets: (u64, u64, u64, usize),
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let (order, starts, uniq, n_uniq) = buckets;
        if n_uniq > 0 {
            let k = self.kernels.embedding_bwd_wte;
            self.launch(
                k,
                (n_uniq as u32, 1),
                (THREADS, 1),
                s,
                &[Arg::P(dwte), Arg::P(dout), Arg::P(order), Arg::P(starts), Arg::P(uniq), i(c)],
            )?;
        }
        let k = self.kernels.embedding_bwd_wpe;
        self.launch(k, (blocks(t * c), 1), (THREADS, 1), s, &[Arg::P(dwpe), Arg::P(dout), i(b), i(t), i(c)])
    }

    #[allow(clippy::too_many_arguments)]
    /// LayerNorm of `n` rows of `c`: the output in fp32 (`out`) and/or
    /// rounded to bf16 (`out16`); 0 skips either.
    pub fn layernorm_fwd(
        &self,
        s: &Stream,
        (out, out16): (u64, u64),
        mean: u64,
        rstd: u64,
        x: u64,
        w: u64,
        b: u64,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let rows_per_block = (THREADS / 32) as usize;
        let grid = u32::try_from(n.div_ceil(rows_per_block)).expect("grid fits");
        let aligned = [x, w, b, out].iter().all(|p| p % 16 == 0) && out16 % 8 == 0;
        if let Some((k, _)) = self.kernels.layernorm_vec(c).filter(|_| aligned) {
            let args = [Arg::P(out), Arg::P(out16), Arg::P(mean), Arg::P(rstd), Arg::P(x), Arg::P(w), Arg::P(b), i(n)];
            return self.launch(k, (grid, 1), (THREADS, 1), s, &args);
        }
        let k = self.kernels.layernorm_fwd;
        self.launch(
            k,
            (grid, 1),
            (THREADS, 1),
            s,
            &[Arg::P(out), Arg::P(out16), Arg::P(mean), Arg::P(rstd), Arg::P(x), Arg::P(w), Arg::P(b), i(n), i(c)],
        )
    }

    /// dx += input gradient; dw += sum dout*norm; db += sum dout.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd(
        &self,
        s: &Stream,
        dx: u64,
        dw: u64,
        db: u64,
        partial: u64,
        dout: u64,
        x: u64,
        w: u64,
        mean: u64,
        rstd: u64,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let chunk = column_chunk(n);
        let r = n.div_ceil(chunk);
        let aligned = [dx, dout, x, w].iter().all(|p| p % 16 == 0);
        if let Some((_, k)) = self.kernels.layernorm_vec(c).filter(|_| aligned) {
            // One pass: dx and the block's column partials.
            let args = [
                Arg::P(dx),
                Arg::P(partial),
                Arg::P(dout),
                Arg::P(x),
                Arg::P(w),
                Arg::P(mean),
                Arg::P(rstd),
                i(n),
                i(chunk),
            ];
            self.launch(k, (r as u32, 1), (THREADS, 1), s, &args)?;
        } else {
            let rows_per_block = (THREADS / 32) as usize;
            let grid = u32::try_from(n.div_ceil(rows_per_block)).expect("grid fits");
            let k = self.kernels.layernorm_bwd_dx;
            self.launch(
                k,
                (grid, 1),
                (THREADS, 1),
                s,
                &[Arg::P(dx), Arg::P(dout), Arg::P(x), Arg::P(w), Arg::P(mean), Arg::P(rstd), i(n), i(c)],
            )?;
            let k = self.kernels.layernorm_param_partial;
            let grid = (c.div_ceil(32) as u32, r as u32);
            self.launch(
                k,
                grid,
                (32, 8),
                s,
                &[Arg::P(partial), Arg::P(dout), Arg::P(x), Arg::P(mean), Arg::P(rstd), i(n), i(c), i(chunk)],
            )?;
        }
        let k = self.kernels.sum_partials;
        self.launch(k, (blocks(c), 1), (THREADS, 1), s, &[Arg::P(dw), Arg::P(partial), i(r), i(c), i(2 * c)])?;
        self.launch(
            k,
            (blocks(c), 1),
            (THREADS, 1),
            s,
            &[Arg::P(db), Arg::P(partial + 4 * c as u64), i(r), i(c), i(2 * c)],
        )
    }

    /// dbias[C] += column sums of dout[N,C].
    pub fn bias_bwd(&self, s: &Stream, dbias: u64, partial: u64, dout: u64, n: usize, c: usize) -> Result<()> {
        self.bias_bwd_cast(s, dbias, partial, (0, 0), dout, n, c)
    }

    /// dbias[C] += column sums of g[N,C], where g = dout, or dout * gelu'(x)
    /// when `gelu_x16` is not 0 (dout is then the gradient of GELU's output
    /// and x its input, kept in bf16); g also goes out rounded to bf16 into
    /// `out16` when that is not 0. `(0, 0)` is [`Self::bias_bwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn bias_bwd_cast(
        &self,
        s: &Stream,
        dbias: u64,
        partial: u64,
        (gelu_x16, out16): (u64, u64),
        dout: u64,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.column_sums(s, dbias, partial, (gelu_x16, out16), (dout, 0), n, c)
    }

    /// dbias[C] += column sums of the bf16 matrix dout16[N,C].
    pub fn bias_bwd16(&self, s: &Stream, dbias: u64, partial: u64, dout16: u64, n: usize, c: usize) -> Result<()> {
        self.column_sums(s, dbias, partial, (0, 0), (0, dout16), n, c)
    }

    /// The `column_partial` kernel and the sum of its partials; `dout` is
    /// (fp32, 0) or (0, bf16).
    #[allow(clippy::too_many_arguments)]
    fn column_sums(
        &self,
        s: &Stream,
        dbias: u64,
        partial: u64,
        (gelu_x16, out16): (u64, u64),
        (dout, dout16): (u64, u64),
        n: usize,
        c: usize,
    ) -> Result<()> {
        let chunk = column_chunk(n);
        let r = n.div_ceil(chunk);
        let k = self.kernels.column_partial;
        self.launch(
            k,
            (c.div_ceil(32) as u32, r as u32),
            (32, 8),
            s,
            &[Arg::P(partial), Arg::P(out16), Arg::P(dout), Arg::P(dout16), Arg::P(gelu_x16), i(n), i(c), i(chunk)],
        )?;
        let k = self.kernels.sum_partials;
        self.launch(k, (blocks(c), 1), (THREADS, 1), s, &[Arg::P(dbias), Arg::P(partial), i(r), i(c), i(c)])
    }

    /// GELU: the output in fp32 (`out`) and/or rounded to bf16 (`out16`),
    /// and the input rounded to bf16 (`x16`); 0 skips any.
    pub fn gelu_fwd(&self, s: &Stream, (out, out16, x16): (u64, u64, u64), x: u64, n: usize) -> Result<()> {
        let args = [Arg::P(out), Arg::P(out16), Arg::P(x16), Arg::P(x), l(n)];
        self.launch(self.kernels.gelu_fwd, (blocks(n), 1), (THREADS, 1), s, &args)
    }

    pub fn gelu_bwd(&self, s: &Stream, d: u64, x: u64, n: usize) -> Result<()> {
        self.launch(self.kernels.gelu_bwd, (blocks(n), 1), (THREADS, 1), s, &[Arg::P(d), Arg::P(x), l(n)])
    }

    pub fn add_inplace(&self, s: &Stream, a: u64, b: u64, n: usize) -> Result<()> {
        self.launch(self.kernels.add_inplace, (blocks(n), 1), (THREADS, 1), s, &[Arg::P(a), Arg::P(b), l(n)])
    }

    pub fn bias_fill(&self, s: &Stream, out: u64, bias: u64, n: usize, c: usize) -> Result<()> {
        self.launch(
            self.kernels.bias_fill,
            (blocks(n * c), 1),
            (THREADS, 1),
            s,
            &[Arg::P(out), Arg::P(bias), i(n), i(c)],
        )
    }

    pub fn to_bf16(&self, s: &Stream, out: u64, x: u64, n: usize) -> Result<()> {
        self.launch(self.kernels.to_bf16, (blocks(n), 1), (THREADS, 1), s, &[Arg::P(out), Arg::P(x), l(n)])
    }

    pub fn from_bf16(&self, s: &Stream, out: u64, x: u64, n: usize) -> Result<()> {
        self.launch(self.kernels.from_bf16, (blocks(n), 1), (THREADS, 1), s, &[Arg::P(out), Arg::P(x), l(n)])
    }

    /// One of q, k, v (or a gradient) into [B,NH,T,HS].
    #[allow(clippy::too_many_arguments)]
    pub fn split_heads(
        &self,
        s: &Stream,
        out: u64,
        inp: u64,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        stride: usize,
        off: usize,
    ) -> Result<()> {
        let k = self.kernels.split_heads;
        self.launch(
            k,
            (blocks(b * t * nh * hs), 1),
            (THREADS, 1),
            s,
            &[Arg::P(out), Arg::P(inp), i(b), i(t), i(nh), i(hs), i(stride), i(off)],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn merge_heads(
        &self,
        s: &Stream,
        out: u64,
        inp: u64,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        stride: usize,
        off: usize,
    ) -> Result<()> {
        let k = self.kernels.merge_heads;
        self.launch(
            k,
            (blocks(b * t * nh * hs), 1),
            (THREADS, 1),
            s,
            &[Arg::P(out), Arg::P(inp), i(b), i(t), i(nh), i(hs), i(stride), i(off)],
        )
    }

    pub fn softmax_causal_fwd(&self, s: &Stream, att: u64, rows: usize, t: usize, scale: f32) -> Result<()> {
        let grid = u32::try_from(rows.div_ceil((THREADS / 32) as usize)).expect("grid fits");
        self.launch(
            self.kernels.softmax_causal_fwd,
            (grid, 1),
            (THREADS, 1),
            s,
            &[Arg::P(att), i(rows), i(t), Arg::F(scale)],
        )
    }

    /// Whether [`Self::fused_attention_fwd`] runs for head size `hs` on this GPU.
    pub fn has_fused_attention(&self, hs: usize) -> bool {
        let fits = self.kernels.fused(hs).is_some_and(|f| f.smem.fits(self.max_shared_optin));
        fused_attention_arch(self.compute_capability) && fits
    }

    /// The fused kernels for head size `hs` and their grid: (query or key
    /// tiles, batch x heads).
    fn fused_launch(&self, b: usize, t: usize, nh: usize, hs: usize) -> (Fused, (u32, u32)) {
        assert!(self.has_fused_attention(hs), "no fused attention for head size {hs}");
        let f = self.kernels.fused(hs).expect("checked");
        (f, (u32::try_from(t.div_ceil(FusedSmem::TILE)).expect("fits"), u32::try_from(b * nh).expect("fits")))
    }

    /// Causal attention of `qkv[B,T,3C]` into `y[B,T,C]` without the T x T
    /// matrix (bf16 products, fp32 softmax), `y` also rounded to bf16 into
    /// `y16` where that is not 0; `lse[B*NH*T]` keeps each row's
    /// log-sum-exp for [`Self::fused_attention_bwd`]. `qkv` is rounded to
    /// bf16 into `qkv16` (B*T*3C), which the backward reads.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_attention_fwd(
        &self,
        s: &Stream,
        (y, y16): (u64, u64),
        lse: u64,
        qkv: u64,
        qkv16: u64,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let (f, grid) = self.fused_launch(b, t, nh, hs);
        self.to_bf16(s, qkv16, qkv, b * t * 3 * nh * hs)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let scale_log2 = Arg::F(scale * std::f32::consts::LOG2_E);
        let args = [Arg::P(y), Arg::P(y16), Arg::P(lse), Arg::P(qkv16), i(t), i(nh), scale_log2];
        self.launch_shared(f.fwd, grid, (FUSED_THREADS, 1), f.smem.fwd, s, &args)
    }

    /// The gradient of [`Self::fused_attention_fwd`]: `dqkv[B,T,3C]`
    /// (overwritten) from `dy[B,T,C]`, the forward's `qkv16`, `y` and `lse`.
    /// Scratch: `dvec` (B*NH*T floats) and `dy16` (dy in bf16).
    #[allow(clippy::too_many_arguments)]
    pub fn fused_attention_bwd(
        &self,
        s: &Stream,
        dqkv: u64,
        qkv16: u64,
        y: u64,
        dy: u64,
        lse: u64,
        (dvec, dy16): (u64, u64),
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let (f, grid) = self.fused_launch(b, t, nh, hs);
        let rows = b * nh * t;
        let warps = u32::try_from(rows.div_ceil((THREADS / 32) as usize)).expect("grid fits");
        let args = [Arg::P(dvec), Arg::P(dy16), Arg::P(dy), Arg::P(y), i(b), i(t), i(nh), i(hs)];
        self.launch(self.kernels.flash_bwd_dvec, (warps, 1), (THREADS, 1), s, &args)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let args = [
            Arg::P(dqkv),
            Arg::P(qkv16),
            Arg::P(dy16),
            Arg::P(lse),
            Arg::P(dvec),
            i(t),
            i(nh),
            Arg::F(scale * std::f32::consts::LOG2_E),
            Arg::F(scale),
        ];
        self.launch_shared(f.dq, grid, (FUSED_THREADS, 1), f.smem.dq, s, &args)?;
        self.launch_shared(f.dkdv, grid, (FUSED_THREADS, 1), f.smem.dkdv, s, &args)
    }

    pub fn softmax_causal_bwd(&self, s: &Stream, d: u64, att: u64, rows: usize, t: usize, scale: f32) -> Result<()> {
        let grid = u32::try_from(rows.div_ceil((THREADS / 32) as usize)).expect("grid fits");
        self.launch(
            self.kernels.softmax_causal_bwd,
            (grid, 1),
            (THREADS, 1),
            s,
            &[Arg::P(d), Arg::P(att), i(rows), i(t), Arg::F(scale)],
        )
    }

    /// Losses of `rows` rows of `v` logits, `stride` apart; with `scale`,
    /// also their gradient over the `stride` columns (zero past `v`): in
    /// place where `out16` is 0, else rounded to bf16 into `out16` (same
    /// strides) with the logits left as they are.
    #[allow(clippy::too_many_arguments)]
    pub fn crossentropy(
        &self,
        s: &Stream,
        losses: u64,
        logits: u64,
        out16: u64,
        targets: u64,
        rows: usize,
        v: usize,
        stride: usize,
        scale: Option<f32>,
    ) -> Result<()> {
        assert!(v <= stride);
        let args = [
            Arg::P(losses),
            Arg::P(logits),
            Arg::P(out16),
            Arg::P(targets),
            i(v),
            i(stride),
            Arg::F(scale.unwrap_or(0.0)),
            Arg::I(scale.is_some() as i32),
        ];
        self.launch(self.kernels.crossentropy, (rows as u32, 1), (512, 1), s, &args)
    }

    /// AdamW on `n` elements; the scalars as the CPU kernel derives them.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        s: &Stream,
        p: u64,
        g: u64,
        m: u64,
        v: u64,
        n: usize,
        st: ws_kernels::adamw::AdamWStep,
    ) -> Result<()> {
        let bc1 = 1.0 - (st.beta1 as f64).powi(st.t as i32);
        let bc2 = 1.0 - (st.beta2 as f64).powi(st.t as i32);
        let step_size = (st.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - st.lr * st.weight_decay;
        let args = [
            Arg::P(p),
            Arg::P(g),
            Arg::P(m),
            Arg::P(v),
            l(n),
            Arg::F(st.beta1),
            Arg::F(st.beta2),
            Arg::F(st.eps),
            Arg::F(decay),
            Arg::F(step_size),
            Arg::F(bc2_sqrt),
            Arg::F(st.grad_scale),
        ];
        self.launch(self.kernels.adamw, (blocks(n), 1), (THREADS, 1), s, &args)
    }

    /// Sum of squares of `x[n]` in double, deterministic: partial sums of
    /// [`SUMSQ_BLOCKS`] blocks into `partial` (doubles), added on the host.
    pub fn sumsq(&self, s: &Stream, partial: u64, x: u64, n: usize) -> Result<f64> {
        self.launch(
            self.kernels.sumsq_partial,
            (SUMSQ_BLOCKS as u32, 1),
            (THREADS, 1),
            s,
            &[Arg::P(partial), Arg::P(x), l(n)],
        )?;
        let mut host = [0f64; SUMSQ_BLOCKS];
        self.download(&mut host, partial, s)?;
        Ok(host.iter().sum())
    }
}

pub const SUMSQ_BLOCKS: usize = 1024;

/// Positions grouped by token for the embedding's backward: `order` lists
/// positions token by token (ascending within a token), `starts[u]..starts[u+1]`
/// is the u-th distinct token's range, `uniq[u]` that token.
pub fn token_buckets(tokens: &[u32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    // A counting sort: stable, so positions stay ascending within a token
    // (what sorting by (token, position) gives, in O(n + vocabulary)).
    let values = tokens.iter().max().map_or(0, |&m| m as usize + 1);
    let mut first = vec![0u32; values + 1];
    for &t in tokens {
        first[t as usize + 1] += 1;
    }
    for i in 1..=values {
        first[i] += first[i - 1];
    }
    let (mut starts, mut uniq) = (Vec::new(), Vec::new());
    for t in 0..values {
        if first[t + 1] > first[t] {
            starts.push(first[t] as i32);
            uniq.push(t as i32);
        }
    }
    starts.push(tokens.len() as i32);
    let mut order = vec![0i32; tokens.len()];
    for (p, &t) in tokens.iter().enumerate() {
        let slot = &mut first[t as usize];
        order[*slot as usize] = p as i32;
        *slot += 1;
    }
    (order, starts, uniq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_group_positions_by_token_in_order() {
        let (order, starts, uniq) = token_buckets(&[5, 3, 5, 9, 3, 5]);
        assert_eq!(uniq, vec![3, 5, 9]);
        assert_eq!(starts, vec![0, 2, 5, 6]);
        assert_eq!(order, vec![1, 4, 0, 2, 5, 3]);
    }

    /// The plain definition: positions sorted by (token, position), then
    /// the runs of equal tokens.
    fn token_buckets_by_sorting(tokens: &[u32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let mut idx: Vec<u32> = (0..tokens.len() as u32).collect();
        idx.sort_by_key(|&p| (tokens[p as usize], p));
        let (mut starts, mut uniq) = (Vec::new(), Vec::new());
        for (k, &p) in idx.iter().enumerate() {
            let tok = tokens[p as usize];
            if k == 0 || tokens[idx[k - 1] as usize] != tok {
                starts.push(k as i32);
                uniq.push(tok as i32);
            }
        }
        starts.push(idx.len() as i32);
        (idx.into_iter().map(|p| p as i32).collect(), starts, uniq)
    }

    #[test]
    fn buckets_equal_the_sorting_definition() {
        let mut rng = ws_kernels::Rng::new(5);
        for (n, vocab) in [(0usize, 10u64), (1, 1), (1000, 7), (65_536, 50_257)] {
            let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
            assert_eq!(token_buckets(&tokens), token_buckets_by_sorting(&tokens), "{n} tokens of {vocab}");
        }
    }

    #[test]
    fn fused_attention_shared_memory_matches_the_source() {
        // The host's sizes against FaSmem<D> in kernels.cu, and within sm_80's 163 KiB.
        assert_eq!(FusedSmem::for_head(64), Some(FusedSmem { fwd: 46080, dq: 55296, dkdv: 56320 }));
        assert_eq!(FusedSmem::for_head(128), Some(FusedSmem { fwd: 87040, dq: 104448, dkdv: 70144 }));
        assert!(SOURCE.contains("static constexpr int FWD = 5 * TILE * 2;"));
        assert!(SOURCE.contains("static constexpr int DQ = 6 * TILE * 2;"));
        assert!(SOURCE.contains("static constexpr int DKDV = (2 * TILE + 4 * BQ * LD) * 2 + 4 * BQ * 4;"));
        assert_eq!(FusedSmem::for_head(96), None);
        assert!(SOURCE.contains("static constexpr int BQ = D == 64 ? 64 : 32;"));
        assert!(SOURCE.contains("#define FA_TILE 64") && SOURCE.contains("#define FA_THREADS 128"));
        assert!(!fused_attention_arch((7, 5)) && fused_attention_arch((8, 0)) && fused_attention_arch((9, 0)));
        // An RTX 4090 (sm_89, 99 KiB a block) runs head size 64 fused, 128 materialised.
        let consumer = 101_376;
        assert!(FusedSmem::for_head(64).unwrap().fits(consumer) && !FusedSmem::for_head(128).unwrap().fits(consumer));
        assert!(FusedSmem::for_head(128).unwrap().fits(232_448), "H100: 227 KiB");
    }

    #[test]
    fn every_kernel_has_a_launcher_name_in_the_source() {
        for name in Kernels::NAMES {
            assert!(SOURCE.contains(&format!("__global__ void {name}(")), "{name} missing from kernels.cu");
        }
    }
}
