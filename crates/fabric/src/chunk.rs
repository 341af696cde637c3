//! Messages (a layer's weights or gradients) cut into chunks of at most
//! `chunk_bytes`, and put back together. Every sender cuts the same message
//! at the same offsets, so the chunks that a node sums line up.

use crate::{Dtype, FabricError, Frame, Kind};
use bytes::Bytes;

/// The header fields every chunk of one message shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageId {
    pub kind: Kind,
    pub dtype: Dtype,
    pub step: u64,
    pub use_index: u32,
    pub layer: u32,
}

/// Cuts `bytes` into frames of at most `chunk_bytes` (a multiple of the dtype's size).
pub fn frames(id: MessageId, bytes: &[u8], chunk_bytes: usize) -> impl Iterator<Item = Frame> + '_ {
    let size = id.dtype.size();
    let chunk = (chunk_bytes / size).max(1) * size;
    let total = bytes.len() as u64;
    // An empty message is one empty chunk, so the receiver still sees it.
    let count = bytes.len().div_ceil(chunk).max(1);
    (0..count).map(move |i| {
        let (lo, hi) = (i * chunk, ((i + 1) * chunk).min(bytes.len()));
        Frame {
            kind: id.kind,
            dtype: id.dtype,
            step: id.step,
            use_index: id.use_index,
            layer: id.layer,
            offset: lo as u64,
            total,
            payload: Bytes::copy_from_slice(&bytes[lo..hi]),
        }
    })
}

/// Puts one message back together from its chunks in order.
pub struct Assembler {
    id: Option<MessageId>,
    next: u64,
    total: u64,
}

impl Default for Assembler {
    fn default() -> Self {
        Assembler::new()
    }
}

impl Assembler {
    pub fn new() -> Assembler {
        Assembler { id: None, next: 0, total: 0 }
    }

    /// Whether a message is partly received.
    pub fn in_progress(&self) -> bool {
        self.id.is_some()
    }

    /// Copies `f`'s payload into `dst` (the whole message's bytes, at least
    /// `f.total` long); returns the message's id once its last chunk is in.
    pub fn add(&mut self, f: &Frame, dst: &mut [u8]) -> Result<Option<(MessageId, usize)>, FabricError> {
        let id = MessageId { kind: f.kind, dtype: f.dtype, step: f.step, use_index: f.use_index, layer: f.layer };
        match self.id {
            None => {
                if f.offset != 0 {
                    return Err(FabricError::Protocol(format!("a message starting at byte {}", f.offset)));
                }
                if f.total as usize > dst.len() {
                    return Err(FabricError::Protocol(format!(
                        "a message of {} bytes for a buffer of {}",
                        f.total,
                        dst.len()
                    )));
                }
                self.id = Some(id);
                self.total = f.total;
            }
            Some(cur) => {
                if cur != id || f.total != self.total || f.offset != self.next {
                    return Err(FabricError::Protocol(format!(
                        "chunk {:?} at byte {} where {:?} at byte {} was due",
                        id, f.offset, cur, self.next
                    )));
                }
            }
        }
        let end = f.offset as usize + f.payload.len();
        dst[f.offset as usize..end].copy_from_slice(&f.payload);
        self.next = end as u64;
        if self.next == self.total {
            self.id = None;
            self.next = 0;
            return Ok(Some((id, self.total as usize)));
        }
        Ok(None)
    }
}

/// The bytes of an f32 slice, for framing (the wire is little-endian, as is every target we build for).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    const { assert!(cfg!(target_endian = "little")) };
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub fn u16_bytes(v: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

pub fn u16_bytes_mut(v: &mut [u16]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_message_and_reassemble_it() {
        let id = MessageId { kind: Kind::Weights, dtype: Dtype::F32, step: 1, use_index: 2, layer: 3 };
        let v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        for chunk in [4, 12, 1000, 4000, 10_000] {
            let fs: Vec<Frame> = frames(id, f32_bytes(&v), chunk).collect();
            assert!(fs.iter().all(|f| f.payload.len() <= chunk.max(4) && f.payload.len() % 4 == 0));
            let mut out = vec![0f32; 1200];
            let mut a = Assembler::new();
            let mut done = None;
            for f in &fs {
                assert!(done.is_none());
                done = a.add(f, f32_bytes_mut(&mut out)).unwrap();
            }
            assert_eq!(done, Some((id, 4000)));
            assert_eq!(&out[..1000], &v[..]);
        }
    }

    #[test]
    fn out_of_order_or_foreign_chunks_are_protocol_errors() {
        let id = MessageId { kind: Kind::Weights, dtype: Dtype::F32, step: 1, use_index: 2, layer: 3 };
        let v = vec![1f32; 100];
        let fs: Vec<Frame> = frames(id, f32_bytes(&v), 40).collect();
        let mut out = vec![0f32; 100];
        let mut a = Assembler::new();
        assert!(a.add(&fs[1], f32_bytes_mut(&mut out)).is_err());
        a.add(&fs[0], f32_bytes_mut(&mut out)).unwrap();
        assert!(a.add(&fs[2], f32_bytes_mut(&mut out)).is_err());
        let mut other = fs[1].clone();
        other.layer = 9;
        let mut b = Assembler::new();
        b.add(&fs[0], f32_bytes_mut(&mut out)).unwrap();
        assert!(b.add(&other, f32_bytes_mut(&mut out)).is_err());
        let mut small = vec![0f32; 10];
        assert!(Assembler::new().add(&fs[0], f32_bytes_mut(&mut small)).is_err());
    }
}
