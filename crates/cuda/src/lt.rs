//! Products through cuBLASLt, for its epilogues: `D = op(A) op(B) + bias
//! (+ a residual)` in one kernel, where cuBLAS would need the bias written
//! into the output first and read back by a product with beta = 1 (two
//! passes over the output); and GELU with its input kept, forward, and
//! GELU's derivative with the bias gradient, backward, both with bf16
//! outputs. A plan (descriptors, layouts and the heuristic's algorithm) is
//! made once per shape, transposes, epilogue and pointer alignments, and
//! reused.
//!
//! Only bf16 and TF32 products come here; exact fp32 stays on
//! `cublasGemmEx`, the reference the CPU parity tests hold to.

use crate::driver::{DevBuf, GemmType, GpuError, Operand, Result};
use cudarc::cublaslt::sys as lt;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// Device scratch cuBLASLt may use per product (what its documentation
/// recommends for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

fn check(r: lt::cublasStatus_t, what: &str) -> Result<()> {
    if r == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError(format!("cuBLASLt {what} failed: {r:?}")))
    }
}

/// Whether libcublasLt.so.13 can be loaded.
pub fn present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { lt::is_culib_present() }
}

/// The largest power of two up to 256 dividing a device address: what
/// cuBLASLt must be told unless a pointer has its default 256-byte alignment.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1 << ptr.trailing_zeros().min(8)
    }
}

/// What a product's epilogue does with `op(A) op(B)` (row-major [M,N]).
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// fp32 `D = AB + bias[N] (+ add[M,N])`; `add` has D's layout.
    Bias { bias: u64, add: Option<u64> },
    /// bf16 `D = gelu(AB + bias)`, and `aux = AB + bias` in bf16 (GELU's
    /// input, for the backward), with D's layout; the bias in fp32, or in
    /// bf16 where `bias16`.
    GeluAux { bias: u64, bias16: bool, aux: u64 },
    /// bf16 `D = AB * gelu'(aux)` (aux as [`Epilogue::GeluAux`] kept it),
    /// and `dbias[N]` = the column sums of D in fp32 (overwritten).
    DGeluBGrad { aux: u64, dbias: u64 },
    /// bf16 `D = AB * gelu'(aux)` alone.
    DGelu { aux: u64 },
}

impl Epilogue {
    fn kind(&self) -> EpiKind {
        match *self {
            Epilogue::Bias { add, .. } => EpiKind::Bias { add: add.is_some() },
            Epilogue::GeluAux { bias16, .. } => EpiKind::GeluAux { bias16 },
            Epilogue::DGeluBGrad { .. } => EpiKind::DGeluBGrad,
            Epilogue::DGelu { .. } => EpiKind::DGelu,
        }
    }

    /// The bias (or bias gradient), the added matrix, the aux matrix (0: none).
    fn pointers(&self) -> (u64, u64, u64) {
        match *self {
            Epilogue::Bias { bias, add } => (bias, add.unwrap_or(0), 0),
            Epilogue::GeluAux { bias, aux, .. } => (bias, 0, aux),
            Epilogue::DGeluBGrad { aux, dbias } => (dbias, 0, aux),
            Epilogue::DGelu { aux } => (0, 0, aux),
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum EpiKind {
    Bias { add: bool },
    GeluAux { bias16: bool },
    DGeluBGrad,
    DGelu,
}

impl EpiKind {
    /// Whether D (and C) are bf16; else fp32.
    fn bf16_out(self) -> bool {
        !matches!(self, EpiKind::Bias { .. })
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    ty: GemmType,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    lda: usize,
    ldb: usize,
    ldc: usize,
    epi: EpiKind,
    /// Alignments of A, B, D, the bias, the added C and aux.
    align: [u32; 6],
}

struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    /// Layouts of cuBLASLt's A (our B), B (our A) and C = D (column-major).
    layouts: [lt::cublasLtMatrixLayout_t; 3],
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Lt::plan`, destroyed once.
        unsafe {
            for l in self.layouts {
                lt::cublasLtMatrixLayoutDestroy(l);
            }
            lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

pub struct Lt {
    handle: lt::cublasLtHandle_t,
    workspace: DevBuf<u8>,
    /// `None`: the heuristic found no algorithm for that key (the caller falls back).
    plans: RefCell<HashMap<Key, Option<Plan>>>,
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: our handle, destroyed once after its plans.
        unsafe {
            lt::cublasLtDestroy(self.handle);
        }
    }
}

unsafe fn set_desc<T>(desc: lt::cublasLtMatmulDesc_t, a: lt::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
    check(
        lt::cublasLtMatmulDescSetAttribute(desc, a, v as *const T as *const c_void, std::mem::size_of::<T>()),
        "cublasLtMatmulDescSetAttribute",
    )
}

unsafe fn set_pref<T>(
    p: lt::cublasLtMatmulPreference_t,
    a: lt::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> Result<()> {
    check(
        lt::cublasLtMatmulPreferenceSetAttribute(p, a, v as *const T as *const c_void, std::mem::size_of::<T>()),
        "cublasLtMatmulPreferenceSetAttribute",
    )
}

impl Lt {
    pub fn new(workspace: DevBuf<u8>) -> Result<Lt> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer.
        check(unsafe { lt::cublasLtCreate(&mut handle) }, "cublasLtCreate")?;
        Ok(Lt { handle, workspace, plans: RefCell::new(HashMap::new()) })
    }

    /// The cases (shape, epilogue, ...) cuBLASLt had no algorithm for, which
    /// fell back to separate passes.
    pub fn missing(&self) -> Vec<String> {
        let plans = self.plans.borrow();
        let mut v: Vec<String> = plans.iter().filter(|(_, p)| p.is_none()).map(|(k, _)| format!("{k:?}")).collect();
        v.sort();
        v
    }

    #[allow(clippy::too_many_arguments)]
    fn key(ty: GemmType, m: usize, n: usize, k: usize, a: Operand, b: Operand, epi: Epilogue, c: Operand) -> Key {
        assert!(ty != GemmType::F32, "exact fp32 products stay on cublasGemmEx");
        assert!(!c.trans, "the output is not transposed");
        let (bias, add, aux) = epi.pointers();
        Key {
            ty,
            m,
            n,
            k,
            ta: a.trans,
            tb: b.trans,
            lda: a.ld,
            ldb: b.ld,
            ldc: c.ld,
            epi: epi.kind(),
            align: [
                alignment(a.ptr),
                alignment(b.ptr),
                alignment(c.ptr),
                alignment(bias),
                alignment(add),
                alignment(aux),
            ],
        }
    }

    /// Whether [`Self::matmul`] would run this case (it has an algorithm);
    /// queues nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn has_plan(
        &self,
        ty: GemmType,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        epi: Epilogue,
        c: Operand,
    ) -> Result<bool> {
        self.ensure_plan(Self::key(ty, m, n, k, a, b, epi, c))
    }

    /// Makes the plan for `key` unless made already; whether it has an algorithm.
    fn ensure_plan(&self, key: Key) -> Result<bool> {
        let mut plans = self.plans.borrow_mut();
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            // SAFETY: descriptor calls on objects `plan` creates.
            e.insert(unsafe { self.plan(&key)? });
        }
        Ok(plans[&key].is_some())
    }

    /// Row-major `C[M,N] = op(A)[M,K] op(B)[K,N]` through `epi` (which says
    /// whether C is fp32 or bf16), on `stream`. `Ok(false)`: cuBLASLt has no
    /// algorithm for this case, nothing was queued.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        stream: cudarc::driver::sys::CUstream,
        ty: GemmType,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        epi: Epilogue,
        c: Operand,
    ) -> Result<bool> {
        let key = Self::key(ty, m, n, k, a, b, epi, c);
        if !self.ensure_plan(key)? {
            return Ok(false);
        }
        let plans = self.plans.borrow();
        let plan = plans[&key].as_ref().expect("ensure_plan found an algorithm");
        let (bias, add, aux) = epi.pointers();
        let (alpha, beta) = (1.0f32, if add != 0 { 1.0f32 } else { 0.0 });
        let c_in = if add != 0 { add } else { c.ptr };
        // SAFETY: the operands are live device ranges of the sizes given
        // (the caller's contract, as for `Gpu::gemm`); the descriptor is ours.
        unsafe {
            use lt::cublasLtMatmulDescAttributes_t as D;
            if bias != 0 {
                set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            if aux != 0 {
                set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux)?;
            }
            // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
            check(
                lt::cublasLtMatmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    b.ptr as *const c_void,
                    plan.layouts[0],
                    a.ptr as *const c_void,
                    plan.layouts[1],
                    &beta as *const f32 as *const c_void,
                    c_in as *const c_void,
                    plan.layouts[2],
                    c.ptr as *mut c_void,
                    plan.layouts[2],
                    &plan.algo,
                    self.workspace.ptr() as *mut c_void,
                    WORKSPACE_BYTES,
                    stream as lt::cudaStream_t,
                ),
                "cublasLtMatmul",
            )?;
        }
        Ok(true)
    }

    unsafe fn plan(&self, key: &Key) -> Result<Option<Plan>> {
        use lt::cublasLtMatmulDescAttributes_t as D;
        use lt::cublasLtMatmulPreferenceAttributes_t as P;
        let (in_ty, compute) = match key.ty {
            GemmType::Bf16 => (lt::cudaDataType::CUDA_R_16BF, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F),
            GemmType::Tf32 => (lt::cudaDataType::CUDA_R_32F, lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            GemmType::F32 => unreachable!("checked by matmul"),
        };
        let mut desc = std::ptr::null_mut();
        check(
            lt::cublasLtMatmulDescCreate(&mut desc, compute, lt::cudaDataType::CUDA_R_32F),
            "cublasLtMatmulDescCreate",
        )?;
        let mut plan = Plan { desc, layouts: [std::ptr::null_mut(); 3], algo: std::mem::zeroed() };
        use cudarc::cublas::sys::cublasOperation_t as Op;
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        // cuBLASLt's A is our B and its B our A (see `matmul`).
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(key.tb))?;
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(key.ta))?;
        use lt::cublasLtEpilogue_t as E;
        let epilogue = match key.epi {
            EpiKind::Bias { .. } => E::CUBLASLT_EPILOGUE_BIAS,
            EpiKind::GeluAux { .. } => E::CUBLASLT_EPILOGUE_GELU_AUX_BIAS,
            EpiKind::DGeluBGrad => E::CUBLASLT_EPILOGUE_DGELU_BGRAD,
            EpiKind::DGelu => E::CUBLASLT_EPILOGUE_DGELU,
        };
        set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        if key.epi.bf16_out() {
            // Beside a bf16 output the bias (gradient) is fp32 unless asked
            // for in bf16; aux has D's type (bf16) and layout.
            let bias_ty = match key.epi {
                EpiKind::GeluAux { bias16: true } => lt::cudaDataType::CUDA_R_16BF,
                _ => lt::cudaDataType::CUDA_R_32F,
            };
            if key.epi != EpiKind::DGelu {
                set_desc(desc, D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(bias_ty as i32))?;
            }
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &(key.ldc as i64))?;
        }
        // Stored shapes (rows, columns) before the transposes, column-major.
        let (n, m, k) = (key.n as u64, key.m as u64, key.k as u64);
        let out_ty = if key.epi.bf16_out() { lt::cudaDataType::CUDA_R_16BF } else { lt::cudaDataType::CUDA_R_32F };
        let shapes = [
            (in_ty, if key.tb { (k, n) } else { (n, k) }, key.ldb),
            (in_ty, if key.ta { (m, k) } else { (k, m) }, key.lda),
            (out_ty, (n, m), key.ldc),
        ];
        for (i, (ty, (rows, cols), ld)) in shapes.into_iter().enumerate() {
            check(
                lt::cublasLtMatrixLayoutCreate(&mut plan.layouts[i], ty, rows, cols, ld as i64),
                "cublasLtMatrixLayoutCreate",
            )?;
        }
        let mut pref = std::ptr::null_mut();
        check(lt::cublasLtMatmulPreferenceCreate(&mut pref), "cublasLtMatmulPreferenceCreate")?;
        let found = (|| -> Result<i32> {
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(WORKSPACE_BYTES as u64))?;
            let [a, b, d, _, c, _] = key.align;
            let c = if key.epi == (EpiKind::Bias { add: true }) { c } else { d };
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &b)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &a)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c)?;
            set_pref(pref, P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d)?;
            let mut result: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
            let mut count = 0;
            let r = lt::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                plan.layouts[0],
                plan.layouts[1],
                plan.layouts[2],
                plan.layouts[2],
                pref,
                1,
                &mut result,
                &mut count,
            );
            if r != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS || count == 0 {
                return Ok(0);
            }
            plan.algo = result.algo;
            Ok(count)
        })();
        lt::cublasLtMatmulPreferenceDestroy(pref);
        Ok(if found? > 0 { Some(plan) } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignments_are_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
        assert_eq!(alignment(0x7f00_0000_0c04), 4);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
    }
}
