//! Products through cuBLASLt, for the bias epilogue: `D = op(A) op(B) +
//! bias` in one kernel, where cuBLAS would need the bias written into the
//! output first and read back by a product with beta = 1 (two passes over
//! the output). A plan (descriptors, layouts and the heuristic's algorithm)
//! is made once per shape, transposes and pointer alignments, and reused.
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
    bias: bool,
    /// Whether C is a separate matrix added to the product (beta = 1).
    add: bool,
    /// Alignments of A, B, D, the bias and C.
    align: [u32; 5],
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

    /// Row-major `C[M,N] = op(A)[M,K] op(B)[K,N] (+ bias[N] on every row)
    /// (+ add[M,N])`, fp32 output, on `stream`; `add` is another matrix with
    /// C's layout (a residual), read by the epilogue. `Ok(false)`: cuBLASLt
    /// has no algorithm for this case, nothing was queued.
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
        bias: Option<u64>,
        add: Option<u64>,
        c: Operand,
    ) -> Result<bool> {
        assert!(ty != GemmType::F32, "exact fp32 products stay on cublasGemmEx");
        assert!(!c.trans, "the output is not transposed");
        let key = Key {
            ty,
            m,
            n,
            k,
            ta: a.trans,
            tb: b.trans,
            lda: a.ld,
            ldb: b.ld,
            ldc: c.ld,
            bias: bias.is_some(),
            add: add.is_some(),
            align: [
                alignment(a.ptr),
                alignment(b.ptr),
                alignment(c.ptr),
                alignment(bias.unwrap_or(0)),
                alignment(add.unwrap_or(0)),
            ],
        };
        let mut plans = self.plans.borrow_mut();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            // SAFETY: descriptor calls on objects `plan` creates.
            std::collections::hash_map::Entry::Vacant(e) => e.insert(unsafe { self.plan(&key)? }),
        };
        let Some(plan) = plan.as_ref() else { return Ok(false) };
        let (alpha, beta) = (1.0f32, if add.is_some() { 1.0f32 } else { 0.0 });
        let c_in = add.unwrap_or(c.ptr);
        // SAFETY: the operands are live device ranges of the sizes given
        // (the caller's contract, as for `Gpu::gemm`); the descriptor is ours.
        unsafe {
            if let Some(p) = bias {
                set_desc(plan.desc, lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)?;
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
        if key.bias {
            set_desc(desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS)?;
        }
        // Stored shapes (rows, columns) before the transposes, column-major.
        let (n, m, k) = (key.n as u64, key.m as u64, key.k as u64);
        let shapes = [
            (in_ty, if key.tb { (k, n) } else { (n, k) }, key.ldb),
            (in_ty, if key.ta { (m, k) } else { (k, m) }, key.lda),
            (lt::cudaDataType::CUDA_R_32F, (n, m), key.ldc),
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
            let [a, b, d, _, c] = key.align;
            let c = if key.add { c } else { d };
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
