//! Page-aligned fp32 buffers for slabs: positioned reads and writes of whole
//! pages, and a size rounded up to 4 KiB so the files are page multiples.
//!
//! They are mapped from the kernel directly (anonymous mmap), not taken from
//! malloc: a store's pages come and go in megabytes, and through malloc they
//! left freed space in per-thread arenas that the process kept (measured:
//! hundreds of MB above the DRAM budget). An unmapped page is memory
//! returned; the DRAM budget is then what the process holds.

use std::ops::{Deref, DerefMut};

const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: *mut f32,
    len: usize,
    bytes: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed floats, the allocation rounded up to whole pages.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let bytes = (len * 4).div_ceil(ALIGN).max(1) * ALIGN;
        // SAFETY: a fresh private anonymous mapping; the kernel zeroes it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "out of memory mapping a {bytes}-byte page");
        // Huge pages where the kernel offers them for the asking (THP
        // "madvise"): a page buffer is tens of MB, touched region by region,
        // and 4 KiB faults were 30% of all the faults of a streamed run at a
        // quarter of the state. SAFETY: advice on the mapping just made;
        // failure (no THP) changes nothing.
        unsafe { libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE) };
        AlignedBuf { ptr: ptr as *mut f32, len, bytes }
    }

    /// The whole allocation (the floats and the zero padding to a page).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `bytes` bytes were allocated at `ptr`.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.bytes) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.bytes) }
    }
}

impl Deref for AlignedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` floats lie within the allocation.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: mapped in `zeroed` with this size.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}
