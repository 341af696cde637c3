//! Page-aligned fp32 buffers for slabs: positioned reads and writes of whole
//! pages, and a size rounded up to 4 KiB so the files are page multiples.

use std::alloc::{alloc_zeroed, dealloc, Layout};
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
        let layout = Layout::from_size_align(bytes, ALIGN).expect("valid layout");
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) } as *mut f32;
        assert!(!ptr.is_null(), "out of memory allocating a {bytes}-byte slab");
        AlignedBuf { ptr, len, bytes }
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
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr as *mut u8, Layout::from_size_align(self.bytes, ALIGN).expect("valid layout")) }
    }
}
