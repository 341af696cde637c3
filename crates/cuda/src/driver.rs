//! The GPU: context, streams, events, device memory, pinned host memory,
//! kernel launches and cuBLAS products, over the CUDA driver API loaded at
//! run time (cudarc's `sys` layer; nothing CUDA is needed to build).
//!
//! One [`Gpu`] per process and thread: it makes the device's primary
//! context current on the thread that creates it, and every call assumes
//! that thread. Three streams: `compute` runs kernels and products,
//! `upload` the host-to-device copies of streamed weights, `download` the
//! gradients going back; they order themselves with events, never with
//! device-wide synchronisation.

use crate::lt::Epilogue;
use cudarc::cublas::sys as cb;
use cudarc::driver::sys as cu;
use std::ffi::{c_void, CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub struct GpuError(pub String);

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GpuError {}

pub type Result<T> = std::result::Result<T, GpuError>;

fn err_name(r: cu::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string or leaves it null.
    unsafe {
        if cu::cuGetErrorName(r, &mut p) == cu::CUresult::CUDA_SUCCESS && !p.is_null() {
            return CStr::from_ptr(p).to_string_lossy().into_owned();
        }
    }
    format!("{r:?}")
}

/// Turns a driver result into ours, naming the call.
pub fn check(r: cu::CUresult, what: &str) -> Result<()> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(GpuError(format!("CUDA {what} failed: {}", err_name(r))))
    }
}

fn check_blas(r: cb::cublasStatus_t, what: &str) -> Result<()> {
    if r == cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(GpuError(format!("cuBLAS {what} failed: {r:?}")))
    }
}

/// Whether the CUDA driver, cuBLAS and NVRTC libraries can be loaded, as an
/// error naming the first one missing. Checked before any CUDA call, since
/// the loader panics on a missing library.
pub fn libraries_present() -> Result<()> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, blas, nvrtc) =
        unsafe { (cu::is_culib_present(), cb::is_culib_present(), cudarc::nvrtc::sys::is_culib_present()) };
    let missing = if !driver {
        "the NVIDIA driver library (libcuda.so)"
    } else if !blas {
        "cuBLAS (libcublas.so.13)"
    } else if !nvrtc {
        "NVRTC (libnvrtc.so.13)"
    } else {
        return Ok(());
    };
    Err(GpuError(format!(
        "no CUDA device: {missing} was not found (install the NVIDIA driver and CUDA 13 libraries, \
         or add their directory to LD_LIBRARY_PATH)"
    )))
}

/// A CUDA stream (non-blocking with respect to the legacy default stream).
pub struct Stream(pub(crate) cu::CUstream);

impl Stream {
    fn new() -> Result<Stream> {
        let mut s = std::ptr::null_mut();
        // SAFETY: out-pointer to a fresh stream handle.
        check(
            unsafe { cu::cuStreamCreate(&mut s, cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(Stream(s))
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream.
        check(unsafe { cu::cuStreamSynchronize(self.0) }, "cuStreamSynchronize")
    }

    /// Work queued on this stream after this call waits for `e`.
    pub fn wait(&self, e: &Event) -> Result<()> {
        // SAFETY: live stream and event.
        check(unsafe { cu::cuStreamWaitEvent(self.0, e.0, 0) }, "cuStreamWaitEvent")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream is ours; errors at teardown are ignored.
        unsafe {
            cu::cuStreamDestroy_v2(self.0);
        }
    }
}

pub struct Event(pub(crate) cu::CUevent);

impl Event {
    /// An event that can time (`timing`) or only order work.
    pub fn new(timing: bool) -> Result<Event> {
        let flags =
            if timing { cu::CUevent_flags::CU_EVENT_DEFAULT } else { cu::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        let mut e = std::ptr::null_mut();
        // SAFETY: out-pointer to a fresh event.
        check(unsafe { cu::cuEventCreate(&mut e, flags as u32) }, "cuEventCreate")?;
        Ok(Event(e))
    }

    pub fn record(&self, s: &Stream) -> Result<()> {
        // SAFETY: live event and stream.
        check(unsafe { cu::cuEventRecord(self.0, s.0) }, "cuEventRecord")
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        check(unsafe { cu::cuEventSynchronize(self.0) }, "cuEventSynchronize")
    }

    /// Milliseconds from `start` to this event (both recorded with timing).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32> {
        let mut ms = 0f32;
        // SAFETY: live events.
        check(unsafe { cu::cuEventElapsedTime_v2(&mut ms, start.0, self.0) }, "cuEventElapsedTime")?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is ours.
        unsafe {
            cu::cuEventDestroy_v2(self.0);
        }
    }
}

/// Device memory of `len` elements of `T`, freed on drop. Allocations are
/// counted against the GPU's ledger ([`Gpu::allocated`]).
pub struct DevBuf<T> {
    ptr: cu::CUdeviceptr,
    len: usize,
    ledger: Arc<AtomicUsize>,
    _t: PhantomData<T>,
}

impl<T> DevBuf<T> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// Address of element `i`.
    pub fn at(&self, i: usize) -> u64 {
        assert!(i <= self.len, "offset {i} outside a buffer of {}", self.len);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: our allocation; the context is never destroyed before exit.
            unsafe {
                cu::cuMemFree_v2(self.ptr);
            }
            self.ledger.fetch_sub(self.bytes(), Ordering::Relaxed);
        }
    }
}

/// Page-locked host memory, for copies that overlap compute.
pub struct PinnedBuf<T> {
    ptr: *mut T,
    len: usize,
}

impl<T: Copy> PinnedBuf<T> {
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `len` elements were allocated; T is plain data (f32, u16).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for PinnedBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocHost.
        unsafe {
            cu::cuMemFreeHost(self.ptr as *mut c_void);
        }
    }
}

/// One kernel argument: a device pointer, an int, a 64-bit int or a float.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// How the fp32 products run: exact fp32 or TF32 tensor cores; bf16 takes
/// bf16 operands with fp32 accumulation and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmType {
    F32,
    Tf32,
    Bf16,
}

/// A row-major operand of a product: device address, leading dimension
/// (elements between rows as stored) and whether it is used transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub trans: bool,
}

impl Operand {
    pub fn n(ptr: u64, ld: usize) -> Operand {
        Operand { ptr, ld, trans: false }
    }
    pub fn t(ptr: u64, ld: usize) -> Operand {
        Operand { ptr, ld, trans: true }
    }
}

/// Strides (elements) between the matrices of a batched product.
#[derive(Clone, Copy, Debug)]
pub struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

pub struct Gpu {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// The most dynamic shared memory a block may ask for (bytes).
    pub max_shared_optin: usize,
    pub total_memory: usize,
    pub driver_version: i32,
    pub compute: Stream,
    pub upload: Stream,
    pub download: Stream,
    blas: cb::cublasHandle_t,
    /// cuBLASLt, for products with a bias; `None` where libcublasLt is
    /// missing or `WS_CUDA_GEMM=cublas` asks for cuBLAS alone (comparisons).
    lt: Option<crate::lt::Lt>,
    pub(crate) kernels: crate::kernels::Kernels,
    ledger: Arc<AtomicUsize>,
}

fn cint(x: usize, what: &str) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{what} = {x} does not fit a 32-bit int"))
}

impl Gpu {
    /// Opens device `ordinal`, compiles the kernels and creates the streams
    /// and the cuBLAS handle. A clear error where CUDA or a GPU is missing.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        libraries_present()?;
        // SAFETY: plain driver API calls with out-pointers; the primary
        // context is retained for the life of the process.
        unsafe {
            check(cu::cuInit(0), "cuInit (is an NVIDIA GPU and driver present?)")?;
            let mut count = 0;
            check(cu::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
            if count <= ordinal as i32 {
                return Err(GpuError(format!("no CUDA device {ordinal}: the driver sees {count} GPU(s)")));
            }
            let mut dev = 0;
            check(cu::cuDeviceGet(&mut dev, ordinal as i32), "cuDeviceGet")?;
            let mut ctx = std::ptr::null_mut();
            check(cu::cuDevicePrimaryCtxRetain(&mut ctx, dev), "cuDevicePrimaryCtxRetain")?;
            check(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
            let mut name = [0 as std::ffi::c_char; 256];
            check(cu::cuDeviceGetName(name.as_mut_ptr(), 256, dev), "cuDeviceGetName")?;
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let attr = |a: cu::CUdevice_attribute| -> Result<i32> {
                let mut v = 0;
                check(cu::cuDeviceGetAttribute(&mut v, a, dev), "cuDeviceGetAttribute")?;
                Ok(v)
            };
            let major = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let multiprocessors = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
            let mut total_memory = 0usize;
            check(cu::cuDeviceTotalMem_v2(&mut total_memory, dev), "cuDeviceTotalMem")?;
            let mut driver_version = 0;
            check(cu::cuDriverGetVersion(&mut driver_version), "cuDriverGetVersion")?;
            let optin = attr(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
            let max_shared_optin = usize::try_from(optin).unwrap_or(0);
            let kernels = crate::kernels::Kernels::load((major, minor), max_shared_optin)?;
            let mut blas = std::ptr::null_mut();
            check_blas(cb::cublasCreate_v2(&mut blas), "cublasCreate")?;
            let mut gpu = Gpu {
                name,
                compute_capability: (major, minor),
                multiprocessors,
                max_shared_optin,
                total_memory,
                driver_version,
                compute: Stream::new()?,
                upload: Stream::new()?,
                download: Stream::new()?,
                blas,
                lt: None,
                kernels,
                ledger: Arc::new(AtomicUsize::new(0)),
            };
            let wanted = std::env::var("WS_CUDA_GEMM").map_or(true, |v| v != "cublas");
            if wanted && crate::lt::present() {
                let workspace = gpu.alloc::<u8>(crate::lt::WORKSPACE_BYTES)?;
                gpu.lt = Some(crate::lt::Lt::new(workspace)?);
            }
            Ok(gpu)
        }
    }

    /// Whether products with a bias run through cuBLASLt's epilogue.
    pub fn uses_cublaslt(&self) -> bool {
        self.lt.is_some()
    }

    /// Turns cuBLASLt off for this GPU handle: every product then runs on
    /// cuBLAS with our kernels around it (the fallbacks, for tests).
    pub fn without_cublaslt(mut self) -> Gpu {
        self.lt = None;
        self
    }

    /// The products cuBLASLt had no algorithm for (they ran as separate
    /// passes instead), one line each; empty without cuBLASLt.
    pub fn cublaslt_missing(&self) -> Vec<String> {
        self.lt.as_ref().map_or_else(Vec::new, |lt| lt.missing())
    }

    /// Row-major `C[M,N] = op(A)[M,K] op(B)[K,N] + bias[N] (+ add[M,N])`
    /// (the bias on every row; `add` another matrix with C's layout, e.g. a
    /// residual), fp32 output, on the compute stream. bf16 and TF32 go
    /// through cuBLASLt's epilogue (one pass over C, reading `add` there)
    /// where it is loaded and the bias is 16-byte aligned; otherwise, and for
    /// exact fp32, the bias is written into C, the product added to it, and
    /// then `add`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bias(
        &self,
        ty: GemmType,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        bias: u64,
        add: Option<u64>,
        c: Operand,
    ) -> Result<()> {
        assert!(add.is_none() || c.ld == n, "an added matrix is dense, as C");
        assert!(bias != 0, "a product with a bias needs its address");
        if let Some(lt) = self.lt.as_ref().filter(|_| ty != GemmType::F32 && bias.is_multiple_of(16) && c.ld == n) {
            if lt.matmul(self.compute.0, ty, m, n, k, a, b, Epilogue::Bias { bias, add }, c)? {
                return Ok(());
            }
        }
        self.bias_fill(&self.compute, c.ptr, bias, m, n)?;
        self.gemm(ty, m, n, k, 1.0, a, b, 1.0, c, None)?;
        match add {
            Some(x) => self.add_inplace(&self.compute, c.ptr, x, m * n),
            None => Ok(()),
        }
    }

    /// bf16 products with GELU after them: row-major `out16[M,N] =
    /// gelu(op(A) op(B) + bias)` and `pre16 = op(A) op(B) + bias` (GELU's
    /// input, for [`Self::gemm_dgelu`]), both bf16. cuBLASLt's GELU epilogue
    /// where it has one, with the bias in fp32, else rounded to bf16 into
    /// `bias16` (N); else the product into `scratch` (fp32, M*N) and our
    /// GELU kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bias_gelu(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        (bias, bias16): (u64, u64),
        (out16, pre16): (u64, u64),
        scratch: u64,
    ) -> Result<()> {
        if let Some(lt) = self.lt.as_ref().filter(|_| bias.is_multiple_of(16)) {
            let (s, o) = (self.compute.0, Operand::n(out16, n));
            let epi = Epilogue::GeluAux { bias, bias16: false, aux: pre16 };
            if lt.matmul(s, GemmType::Bf16, m, n, k, a, b, epi, o)? {
                return Ok(());
            }
            let epi = Epilogue::GeluAux { bias: bias16, bias16: true, aux: pre16 };
            if lt.has_plan(GemmType::Bf16, m, n, k, a, b, epi, o)? {
                self.to_bf16(&self.compute, bias16, bias, n)?;
                lt.matmul(s, GemmType::Bf16, m, n, k, a, b, epi, o)?;
                return Ok(());
            }
        }
        self.gemm_bias(GemmType::Bf16, m, n, k, a, b, bias, None, Operand::n(scratch, n))?;
        self.gelu_fwd(&self.compute, (0, out16, pre16), scratch, m * n)
    }

    /// GELU's backward inside the bf16 product that makes its output's
    /// gradient: row-major `out16[M,N] = (op(A) op(B)) * gelu'(pre16)` in
    /// bf16, and `dbias[N] +=` its column sums. cuBLASLt's epilogue where it
    /// has one (with the sums, into `partial` then added; or without, then
    /// summed from the bf16 output); else the product into `scratch` (fp32,
    /// M*N) and one pass of our kernel. `partial` holds
    /// [`crate::kernels::partial_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_dgelu(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        pre16: u64,
        (dbias, partial): (u64, u64),
        out16: u64,
        scratch: u64,
    ) -> Result<()> {
        if let Some(lt) = self.lt.as_ref() {
            let (s, o) = (self.compute.0, Operand::n(out16, n));
            let epi = Epilogue::DGeluBGrad { aux: pre16, dbias: partial };
            if lt.matmul(s, GemmType::Bf16, m, n, k, a, b, epi, o)? {
                return self.add_inplace(&self.compute, dbias, partial, n);
            }
            if lt.matmul(s, GemmType::Bf16, m, n, k, a, b, Epilogue::DGelu { aux: pre16 }, o)? {
                return self.bias_bwd16(&self.compute, dbias, partial, out16, m, n);
            }
        }
        self.gemm(GemmType::Bf16, m, n, k, 1.0, a, b, 0.0, Operand::n(scratch, n), None)?;
        self.bias_bwd_cast(&self.compute, dbias, partial, (pre16, out16), scratch, m, n)
    }

    /// Bytes of device memory this process holds through [`DevBuf`]s.
    pub fn allocated(&self) -> usize {
        self.ledger.load(Ordering::Relaxed)
    }

    /// (free, total) device memory as the driver reports it.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        let (mut free, mut total) = (0, 0);
        // SAFETY: out-pointers.
        check(unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) }, "cuMemGetInfo")?;
        Ok((free, total))
    }

    /// Uninitialised device memory for `len` elements.
    pub fn alloc<T>(&self, len: usize) -> Result<DevBuf<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let mut ptr = 0;
        if bytes > 0 {
            // SAFETY: out-pointer.
            check(unsafe { cu::cuMemAlloc_v2(&mut ptr, bytes) }, &format!("cuMemAlloc of {bytes} bytes"))?;
        }
        self.ledger.fetch_add(bytes, Ordering::Relaxed);
        Ok(DevBuf { ptr, len, ledger: self.ledger.clone(), _t: PhantomData })
    }

    /// Zeroed device memory (synchronously).
    pub fn zeros<T>(&self, len: usize) -> Result<DevBuf<T>> {
        let b = self.alloc::<T>(len)?;
        self.memset_zero(b.ptr, b.bytes(), &self.compute)?;
        self.compute.synchronize()?;
        Ok(b)
    }

    /// Page-locked host memory for `len` elements.
    pub fn pinned<T: Copy>(&self, len: usize) -> Result<PinnedBuf<T>> {
        let mut p = std::ptr::null_mut();
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: out-pointer.
        check(unsafe { cu::cuMemAllocHost_v2(&mut p, bytes) }, &format!("cuMemAllocHost of {bytes} bytes"))?;
        Ok(PinnedBuf { ptr: p as *mut T, len })
    }

    /// Page-locks existing host memory (a long-lived buffer); undo with [`Self::unpin`].
    ///
    /// # Safety
    /// The memory must stay allocated until unpinned.
    pub unsafe fn pin(&self, ptr: *const u8, bytes: usize) -> Result<()> {
        check(cu::cuMemHostRegister_v2(ptr as *mut c_void, bytes, cu::CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")
    }

    /// # Safety
    /// `ptr` was pinned by [`Self::pin`].
    pub unsafe fn unpin(&self, ptr: *const u8) {
        cu::cuMemHostUnregister(ptr as *mut c_void);
    }

    pub fn memset_zero(&self, ptr: u64, bytes: usize, s: &Stream) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the caller passes a live device range.
        check(unsafe { cu::cuMemsetD8Async(ptr, 0, bytes, s.0) }, "cuMemsetD8Async")
    }

    /// Host to device, queued on `s`. From pageable memory the call returns
    /// once the data is staged, so `src` may be reused at once; from pinned
    /// memory it must live until `s` passes the copy.
    pub fn upload<T: Copy>(&self, dst: u64, src: &[T], s: &Stream) -> Result<()> {
        let bytes = std::mem::size_of_val(src);
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `src` is valid for `bytes`; `dst` a live device range.
        check(unsafe { cu::cuMemcpyHtoDAsync_v2(dst, src.as_ptr() as *const c_void, bytes, s.0) }, "cuMemcpyHtoDAsync")
    }

    /// Device to host, queued on `s`.
    ///
    /// # Safety
    /// `dst` must stay valid and untouched until `s` has passed the copy.
    pub unsafe fn download_async<T: Copy>(&self, dst: &mut [T], src: u64, s: &Stream) -> Result<()> {
        let bytes = std::mem::size_of_val(dst);
        if bytes == 0 {
            return Ok(());
        }
        check(cu::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr() as *mut c_void, src, bytes, s.0), "cuMemcpyDtoHAsync")
    }

    /// Device to host, waiting for it (and for everything before it on `s`).
    pub fn download<T: Copy>(&self, dst: &mut [T], src: u64, s: &Stream) -> Result<()> {
        // SAFETY: we wait for the copy before returning.
        unsafe { self.download_async(dst, src, s)? };
        s.synchronize()
    }

    pub fn copy_d2d(&self, dst: u64, src: u64, bytes: usize, s: &Stream) -> Result<()> {
        // SAFETY: live device ranges.
        check(unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, s.0) }, "cuMemcpyDtoDAsync")
    }

    /// Launches a kernel of ours on `s`.
    pub(crate) fn launch(
        &self,
        f: cu::CUfunction,
        grid: (u32, u32),
        block: (u32, u32),
        s: &Stream,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_shared(f, grid, block, 0, s, args)
    }

    /// [`Self::launch`] with `shared` bytes of dynamic shared memory.
    pub(crate) fn launch_shared(
        &self,
        f: cu::CUfunction,
        grid: (u32, u32),
        block: (u32, u32),
        shared: usize,
        s: &Stream,
        args: &[Arg],
    ) -> Result<()> {
        assert!(args.len() <= 16, "at most 16 kernel arguments");
        let mut slots = [0u64; 16];
        for (slot, a) in slots.iter_mut().zip(args) {
            *slot = match *a {
                Arg::P(p) => p,
                Arg::I(i) => i as u32 as u64,
                Arg::L(l) => l as u64,
                Arg::F(x) => x.to_bits() as u64,
            };
        }
        let mut ptrs: Vec<*mut c_void> =
            slots.iter_mut().take(args.len()).map(|s| s as *mut u64 as *mut c_void).collect();
        // SAFETY: each argument slot holds the value in its low bytes
        // (little-endian), sized as the kernel's parameter reads it.
        check(
            unsafe {
                cu::cuLaunchKernel(
                    f,
                    grid.0,
                    grid.1,
                    1,
                    block.0,
                    block.1,
                    1,
                    u32::try_from(shared).expect("shared memory fits u32"),
                    s.0,
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }

    /// Row-major `C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C`, fp32
    /// output, on the compute stream; `batch` for strided batched products.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ty: GemmType,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        batch: Option<Batch>,
    ) -> Result<()> {
        assert!(!c.trans, "the output is not transposed");
        let (in_ty, compute) = match ty {
            GemmType::F32 => (cb::cudaDataType::CUDA_R_32F, cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC),
            GemmType::Tf32 => (cb::cudaDataType::CUDA_R_32F, cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            GemmType::Bf16 => (cb::cudaDataType::CUDA_R_16BF, cb::cublasComputeType_t::CUBLAS_COMPUTE_32F),
        };
        let op = |t: bool| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T:
        // swap the operands and the sizes M, N; the transpose flags carry over.
        let (mi, ni, ki) = (cint(n, "N"), cint(m, "M"), cint(k, "K"));
        let (lda, ldb, ldc) = (cint(b.ld, "ldb"), cint(a.ld, "lda"), cint(c.ld, "ldc"));
        // SAFETY: the caller's operands are live device ranges of the sizes given.
        unsafe {
            check_blas(cb::cublasSetStream_v2(self.blas, self.compute.0 as cb::cudaStream_t), "cublasSetStream")?;
            let alpha_p = &alpha as *const f32 as *const c_void;
            let beta_p = &beta as *const f32 as *const c_void;
            match batch {
                None => check_blas(
                    cb::cublasGemmEx(
                        self.blas,
                        op(b.trans),
                        op(a.trans),
                        mi,
                        ni,
                        ki,
                        alpha_p,
                        b.ptr as *const c_void,
                        in_ty,
                        lda,
                        a.ptr as *const c_void,
                        in_ty,
                        ldb,
                        beta_p,
                        c.ptr as *mut c_void,
                        cb::cudaDataType::CUDA_R_32F,
                        ldc,
                        compute,
                        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    ),
                    "cublasGemmEx",
                ),
                Some(bt) => check_blas(
                    cb::cublasGemmStridedBatchedEx(
                        self.blas,
                        op(b.trans),
                        op(a.trans),
                        mi,
                        ni,
                        ki,
                        alpha_p,
                        b.ptr as *const c_void,
                        in_ty,
                        lda,
                        bt.b as i64,
                        a.ptr as *const c_void,
                        in_ty,
                        ldb,
                        bt.a as i64,
                        beta_p,
                        c.ptr as *mut c_void,
                        cb::cudaDataType::CUDA_R_32F,
                        ldc,
                        bt.c as i64,
                        cint(bt.count, "batch count"),
                        compute,
                        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    ),
                    "cublasGemmStridedBatchedEx",
                ),
            }
        }
    }

    /// Waits for all three streams.
    pub fn synchronize(&self) -> Result<()> {
        self.compute.synchronize()?;
        self.upload.synchronize()?;
        self.download.synchronize()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.synchronize();
        self.lt = None;
        // SAFETY: our handle; the primary context stays until exit.
        unsafe {
            cb::cublasDestroy_v2(self.blas);
        }
    }
}

/// A NUL-terminated kernel name.
pub(crate) fn cname(s: &str) -> CString {
    CString::new(s).expect("kernel names have no NUL")
}
