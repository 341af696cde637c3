//! Page-aligned fp32 buffers for slabs: positioned reads and writes of whole
//! pages, and a size rounded up to 4 KiB so the files are page multiples.
//!
//! They are mapped from the kernel directly (anonymous mmap), not taken from
//! malloc: a store's pages come and go in megabytes, and through malloc they
//! left freed space in per-thread arenas that the process kept (measured:
//! hundreds of MB above the DRAM budget). An unmapped page is memory
//! returned; the DRAM budget is then what the process holds.
//!
//! A buffer has a capacity and a length: the store hands an evicted page's
//! buffer to the next page that fits in it rather than mapping fresh memory,
//! whose first touch (a fault and zeroing per 4 KiB or 2 MiB) ran at 0.3 to
//! 2 GB/s on the 2-core VM, against 7 GB/s for a read into memory already
//! touched.

use std::ops::{Deref, DerefMut};

const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: *mut f32,
    /// Floats in use.
    len: usize,
    /// Floats it can hold.
    capacity: usize,
    /// Bytes mapped: the capacity, rounded up to whole pages.
    bytes: usize,
}

// SAFETY: the buffer is uniquely owned heap memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed floats, the allocation rounded up to whole pages.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf::with_capacity(len, len)
    }

    /// `len` zeroed floats in room for `capacity` (at least `len`).
    pub fn with_capacity(capacity: usize, len: usize) -> AlignedBuf {
        assert!(len <= capacity, "{len} floats in a buffer of {capacity}");
        let bytes = (capacity * 4).div_ceil(ALIGN).max(1) * ALIGN;
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
        AlignedBuf { ptr: ptr as *mut f32, len, capacity, bytes }
    }

    /// Faults the whole buffer in now (where the kernel can), so that its
    /// first reads into it later run at the speed of memory already touched:
    /// for buffers that will be reused page after page.
    pub fn populate(&mut self) {
        // SAFETY: advice on this buffer's own mapping; a kernel without
        // MADV_POPULATE_WRITE (before 5.14) refuses it and nothing changes.
        unsafe { libc::madvise(self.ptr as *mut libc::c_void, self.bytes, libc::MADV_POPULATE_WRITE) };
    }

    /// Floats the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Uses the first `len` floats (at most the capacity). Their values are
    /// whatever the buffer last held: a caller fills what it reads.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "{len} floats in a buffer of {}", self.capacity());
        self.len = len;
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
