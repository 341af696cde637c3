//! The CUDA worker backend of weightstream.
//!
//! The CUDA driver, cuBLAS and NVRTC are loaded at run time (cudarc with
//! dynamic loading), so this crate builds and its tests run on machines
//! without CUDA: there [`Gpu::new`] returns a clear error and the GPU tests
//! skip with a message. Our kernels are CUDA C (`kernels.cu`) compiled by
//! NVRTC for the device at start-up; products go through cuBLAS, and those
//! with a bias through cuBLASLt's bias epilogue where the library is present.
//!
//! - [`driver`]: the GPU, its streams and events, device and pinned memory,
//!   launches and products;
//! - [`kernels`]: the CUDA C kernels' launchers, one per CPU kernel;
//! - [`lt`]: products with a bias through cuBLASLt;
//! - [`workspace`]: activations and the per-layer forward and backward, the
//!   device twin of `ws_model::Workspace`.

pub mod driver;
pub mod kernels;
pub mod lt;
pub mod params;
pub mod workspace;

pub use driver::{Arg, Batch, DevBuf, Event, GemmType, Gpu, GpuError, Operand, PinnedBuf, Result, Stream};
pub use params::DeviceParams;
pub use workspace::GpuWorkspace;

/// Opens GPU 0, or says why not ("CUDA tests skipped: ...") for tests that
/// need one: `None` where no GPU is usable.
pub fn gpu_for_tests() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("CUDA tests skipped: {e}");
            None
        }
    }
}
