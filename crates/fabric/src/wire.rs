//! The wire protocol (docs/fabric-protocol.md is its prose form): the frame
//! header, its checks, and the connection handshake with the cluster secret.
//!
//! A frame is a 72-byte header and a payload. All integers little-endian.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 4 | magic `WSFB` |
//! | 4 | 1 | protocol version ([`VERSION`]) |
//! | 5 | 1 | kind ([`Kind`]) |
//! | 6 | 1 | dtype ([`Dtype`]) |
//! | 7 | 1 | flags (bit 0: the MAC covers the payload too) |
//! | 8 | 8 | sequence number of this frame on this connection and direction |
//! | 16 | 8 | step |
//! | 24 | 4 | use index (the schedule's use) |
//! | 28 | 4 | layer |
//! | 32 | 8 | byte offset of this chunk in its message |
//! | 40 | 8 | total bytes of the message |
//! | 48 | 4 | payload length in bytes |
//! | 52 | 4 | CRC-32 of the payload |
//! | 56 | 16 | MAC: HMAC-SHA256 under the direction's session key of bytes 0..56 (and the payload with flag bit 0), first 16 bytes |
//!
//! The sequence number starts at 0 after the handshake and grows by one per
//! frame; a frame with another number (a replay, a drop, a reorder) is
//! refused, and the MAC stops anyone without the session key from forging
//! one. Session keys are fresh per connection (both nonces go into them), so
//! a frame recorded from another connection never verifies.
//!
//! Handshake (client = the child, server = the parent it connects to):
//! 1. client -> server `HELLO`: magic `WSFH`, version (2), role (1), pad (1),
//!    position (4), client nonce (32): 44 bytes.
//! 2. server -> client: server nonce (32), server proof (32) =
//!    HMAC(secret, "ws-server" | hello | server nonce).
//! 3. client checks the server proof, then sends its proof (32) =
//!    HMAC(secret, "ws-client" | hello | server nonce).
//! 4. server checks it; session keys are HMAC(secret, "ws-c2s" | hello |
//!    server nonce) and HMAC(secret, "ws-s2c" | ...).
//!
//! Each side proves knowledge of the secret without sending it; the checks
//! are constant-time (the `hmac` crate's `verify_slice`).

use crate::FabricError;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

type HmacSha256 = Hmac<Sha256>;

pub const MAGIC: [u8; 4] = *b"WSFB";
pub const HELLO_MAGIC: [u8; 4] = *b"WSFH";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 72;
pub const MAC_BYTES: usize = 16;
/// The largest payload any build accepts; `fabric.chunk_bytes` must be below.
pub const PAYLOAD_BYTES_MAX: usize = 64 << 20;
/// The largest message (a layer's weights) a chunk may belong to.
pub const MESSAGE_BYTES_MAX: u64 = 1 << 40;
pub const FLAG_MAC_PAYLOAD: u8 = 1;
const HELLO_BYTES: usize = 44;
/// How long a peer may take over its part of the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The cluster secret's minimum length in bytes.
pub const SECRET_BYTES_MIN: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Down: a pass starts (payload: [`PassStart`] as 16 bytes).
    Begin = 1,
    /// Down: a chunk of a layer's weights.
    Weights = 2,
    /// Up: a chunk of a layer's gradients, summed on the way.
    Grads = 3,
    /// Up: per-pass statistics (the loss sum, f64), summed on the way.
    Stats = 4,
    /// Down: the run is over; every node forwards it and stops.
    Shutdown = 5,
    /// Flow control: the peer may send this many more data frames.
    Credit = 6,
    /// Rendezvous: a JSON message (join request, assignment, refusal).
    Control = 7,
    /// Down: the sparse tensors' patterns (a safetensors file of indices),
    /// before the first pass of a tree and after every change.
    Masks = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Begin,
            2 => Kind::Weights,
            3 => Kind::Grads,
            4 => Kind::Stats,
            5 => Kind::Shutdown,
            6 => Kind::Credit,
            7 => Kind::Control,
            8 => Kind::Masks,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Dtype {
    None = 0,
    F32 = 1,
    Bf16 = 2,
    F64 = 3,
}

impl Dtype {
    fn from_u8(v: u8) -> Option<Dtype> {
        Some(match v {
            0 => Dtype::None,
            1 => Dtype::F32,
            2 => Dtype::Bf16,
            3 => Dtype::F64,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::None => 1,
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::F64 => 8,
        }
    }
}

/// One frame as the tree code sees it (sequence numbers, checksums and MACs
/// exist only on TCP).
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub kind: Kind,
    pub dtype: Dtype,
    pub step: u64,
    pub use_index: u32,
    pub layer: u32,
    pub offset: u64,
    pub total: u64,
    pub payload: Bytes,
}

/// What a `Begin` frame announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassStart {
    pub training: bool,
    /// The step (training) or the evaluation pass index.
    pub index: u64,
}

impl Frame {
    pub fn control(kind: Kind) -> Frame {
        Frame { kind, dtype: Dtype::None, step: 0, use_index: 0, layer: 0, offset: 0, total: 0, payload: Bytes::new() }
    }

    pub fn begin(p: PassStart) -> Frame {
        let mut b = [0u8; 16];
        b[0] = u8::from(p.training);
        b[8..].copy_from_slice(&p.index.to_le_bytes());
        Frame { total: 16, payload: Bytes::copy_from_slice(&b), ..Frame::control(Kind::Begin) }
    }

    pub fn pass_start(&self) -> Result<PassStart, FabricError> {
        if self.kind != Kind::Begin || self.payload.len() != 16 || self.payload[0] > 1 {
            return Err(FabricError::Protocol(format!("a malformed Begin frame ({} bytes)", self.payload.len())));
        }
        let index = u64::from_le_bytes(self.payload[8..16].try_into().expect("8 bytes"));
        Ok(PassStart { training: self.payload[0] == 1, index })
    }

    /// The identity of a chunk: what must agree between the children a node sums.
    pub fn key(&self) -> (Kind, Dtype, u64, u32, u32, u64, u64, usize) {
        (self.kind, self.dtype, self.step, self.use_index, self.layer, self.offset, self.total, self.payload.len())
    }

    /// Whether this frame spends a flow-control credit.
    pub fn is_data(&self) -> bool {
        self.kind != Kind::Credit
    }
}

/// The decoded fixed fields of a header, before the payload is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub dtype: Dtype,
    pub flags: u8,
    pub seq: u64,
    pub step: u64,
    pub use_index: u32,
    pub layer: u32,
    pub offset: u64,
    pub total: u64,
    pub len: u32,
    pub crc: u32,
    pub mac: [u8; MAC_BYTES],
}

/// A direction's MAC key, keyed once.
#[derive(Clone)]
pub struct MacKey(HmacSha256);

impl MacKey {
    pub fn new(key: &[u8]) -> MacKey {
        MacKey(HmacSha256::new_from_slice(key).expect("HMAC takes any key length"))
    }

    fn tag(&self, head: &[u8], payload: Option<&[u8]>) -> [u8; MAC_BYTES] {
        let mut m = self.0.clone();
        m.update(head);
        if let Some(p) = payload {
            m.update(p);
        }
        let full = m.finalize().into_bytes();
        full[..MAC_BYTES].try_into().expect("16 of 32 bytes")
    }
}

/// Writes the header of `f` with sequence number `seq` under `key`.
pub fn encode_header(f: &Frame, seq: u64, key: &MacKey, mac_payload: bool) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = f.kind as u8;
    h[6] = f.dtype as u8;
    h[7] = if mac_payload { FLAG_MAC_PAYLOAD } else { 0 };
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&f.step.to_le_bytes());
    h[24..28].copy_from_slice(&f.use_index.to_le_bytes());
    h[28..32].copy_from_slice(&f.layer.to_le_bytes());
    h[32..40].copy_from_slice(&f.offset.to_le_bytes());
    h[40..48].copy_from_slice(&f.total.to_le_bytes());
    let len = u32::try_from(f.payload.len()).expect("payloads are below PAYLOAD_BYTES_MAX");
    h[48..52].copy_from_slice(&len.to_le_bytes());
    h[52..56].copy_from_slice(&crc32fast::hash(&f.payload).to_le_bytes());
    let mac = key.tag(&h[..56], mac_payload.then_some(&f.payload[..]));
    h[56..].copy_from_slice(&mac);
    h
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Checks a header's own fields (everything that needs no key or payload):
/// magic, version, kind, dtype, flags, lengths against `payload_max`.
pub fn decode_header(h: &[u8], payload_max: usize) -> Result<Header, FabricError> {
    let bad = |what: String| Err(FabricError::Frame(what));
    if h.len() != HEADER_BYTES {
        return bad(format!("a header of {} bytes, expected {HEADER_BYTES}", h.len()));
    }
    if h[0..4] != MAGIC {
        return bad("bad magic (not a weightstream fabric frame)".into());
    }
    if h[4] != VERSION {
        return bad(format!("protocol version {}, this build speaks {VERSION}", h[4]));
    }
    let Some(kind) = Kind::from_u8(h[5]) else { return bad(format!("unknown frame kind {}", h[5])) };
    let Some(dtype) = Dtype::from_u8(h[6]) else { return bad(format!("unknown dtype {}", h[6])) };
    if h[7] & !FLAG_MAC_PAYLOAD != 0 {
        return bad(format!("unknown flags {:#x}", h[7]));
    }
    let hd = Header {
        kind,
        dtype,
        flags: h[7],
        seq: le64(&h[8..16]),
        step: le64(&h[16..24]),
        use_index: le32(&h[24..28]),
        layer: le32(&h[28..32]),
        offset: le64(&h[32..40]),
        total: le64(&h[40..48]),
        len: le32(&h[48..52]),
        crc: le32(&h[52..56]),
        mac: h[56..72].try_into().expect("16 bytes"),
    };
    let len = hd.len as usize;
    if len > payload_max.min(PAYLOAD_BYTES_MAX) {
        return bad(format!("a payload of {len} bytes, above the limit of {}", payload_max.min(PAYLOAD_BYTES_MAX)));
    }
    if hd.total > MESSAGE_BYTES_MAX || hd.offset.checked_add(len as u64).is_none_or(|end| end > hd.total) {
        return bad(format!("a chunk at byte {} of {} bytes past its message's {} bytes", hd.offset, len, hd.total));
    }
    if !len.is_multiple_of(dtype.size()) || !hd.offset.is_multiple_of(dtype.size() as u64) {
        return bad(format!("a chunk of {len} bytes at {} that splits a {:?} element", hd.offset, dtype));
    }
    Ok(hd)
}

/// Checks sequence, MAC and checksum of a decoded header and its payload.
pub fn verify(h: &Header, raw: &[u8], payload: &[u8], key: &MacKey, expected_seq: u64) -> Result<(), FabricError> {
    let mac_payload = h.flags & FLAG_MAC_PAYLOAD != 0;
    let want = key.tag(&raw[..56], mac_payload.then_some(payload));
    // Constant-time enough: the tag is compared in full either way.
    if want.iter().zip(&h.mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
        return Err(FabricError::Frame("bad MAC (forged, corrupted, or from another connection)".into()));
    }
    if h.seq != expected_seq {
        return Err(FabricError::Frame(format!("sequence {} where {expected_seq} was due (a replay or a gap)", h.seq)));
    }
    if crc32fast::hash(payload) != h.crc {
        return Err(FabricError::Frame("payload checksum mismatch".into()));
    }
    Ok(())
}

/// A frame from a verified header and payload.
pub fn frame_of(h: &Header, payload: Bytes) -> Frame {
    Frame {
        kind: h.kind,
        dtype: h.dtype,
        step: h.step,
        use_index: h.use_index,
        layer: h.layer,
        offset: h.offset,
        total: h.total,
        payload,
    }
}

/// Decodes one whole frame from `bytes` (header, then payload) as the TCP
/// reader does, checking everything: the entry point of the fuzz target.
pub fn decode_frame(bytes: &[u8], key: &MacKey, expected_seq: u64, payload_max: usize) -> Result<Frame, FabricError> {
    let raw = bytes
        .get(..HEADER_BYTES)
        .ok_or_else(|| FabricError::Frame(format!("{} bytes, a truncated header", bytes.len())))?;
    let h = decode_header(raw, payload_max)?;
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + h.len as usize).ok_or_else(|| {
        FabricError::Frame(format!("a truncated payload ({} of {} bytes)", bytes.len() - HEADER_BYTES, h.len))
    })?;
    verify(&h, raw, payload, key, expected_seq)?;
    Ok(frame_of(&h, Bytes::copy_from_slice(payload)))
}

/// Keys of one connection, per direction.
#[derive(Clone)]
pub struct SessionKeys {
    pub send: MacKey,
    pub recv: MacKey,
}

/// Who connected, as its hello says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub role: u8,
    pub position: u32,
}

fn hmac_parts(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Fills `buf` from the operating system's random source.
pub fn random_fill(buf: &mut [u8]) -> Result<(), FabricError> {
    getrandom::fill(buf).map_err(|e| FabricError::Io(format!("no randomness from the OS: {e}")))
}

fn nonce() -> Result<[u8; 32], FabricError> {
    let mut n = [0u8; 32];
    random_fill(&mut n)?;
    Ok(n)
}

fn keys(secret: &[u8], hello: &[u8], ns: &[u8], client: bool) -> SessionKeys {
    let c2s = MacKey::new(&hmac_parts(secret, &[b"ws-c2s", hello, ns]));
    let s2c = MacKey::new(&hmac_parts(secret, &[b"ws-s2c", hello, ns]));
    if client {
        SessionKeys { send: c2s, recv: s2c }
    } else {
        SessionKeys { send: s2c, recv: c2s }
    }
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, FabricError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(FabricError::Handshake(format!("{what}: {e}"))),
        Err(_) => Err(FabricError::Handshake(format!("{what}: no answer within {HANDSHAKE_TIMEOUT:?}"))),
    }
}

/// The client's half of the handshake.
pub async fn handshake_client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &[u8],
    hello: Hello,
) -> Result<SessionKeys, FabricError> {
    let mut h = [0u8; HELLO_BYTES];
    h[0..4].copy_from_slice(&HELLO_MAGIC);
    h[4..6].copy_from_slice(&u16::from(VERSION).to_le_bytes());
    h[6] = hello.role;
    h[8..12].copy_from_slice(&hello.position.to_le_bytes());
    h[12..44].copy_from_slice(&nonce()?);
    timed("sending hello", s.write_all(&h)).await?;
    let mut ch = [0u8; 64];
    timed("reading the challenge", s.read_exact(&mut ch)).await?;
    let (ns, proof) = ch.split_at(32);
    let mut m = HmacSha256::new_from_slice(secret).expect("any key length");
    m.update(b"ws-server");
    m.update(&h);
    m.update(ns);
    m.verify_slice(proof).map_err(|_| FabricError::Auth("the server does not know the cluster secret".into()))?;
    let mine = hmac_parts(secret, &[b"ws-client", &h, ns]);
    timed("sending the proof", s.write_all(&mine)).await?;
    let mut ok = [0u8; 4];
    timed("reading the verdict", s.read_exact(&mut ok))
        .await
        .map_err(|_| FabricError::Auth("the server refused this client's proof (wrong cluster secret?)".into()))?;
    if ok != *b"WSOK" {
        return Err(FabricError::Auth("the server refused this client".into()));
    }
    Ok(keys(secret, &h, ns, true))
}

/// The server's half of the handshake; on success, who connected.
pub async fn handshake_server<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: &[u8],
) -> Result<(Hello, SessionKeys), FabricError> {
    let mut h = [0u8; HELLO_BYTES];
    timed("reading hello", s.read_exact(&mut h)).await?;
    if h[0..4] != HELLO_MAGIC {
        return Err(FabricError::Handshake("not a weightstream fabric client (bad hello magic)".into()));
    }
    let v = u16::from_le_bytes([h[4], h[5]]);
    if v != u16::from(VERSION) {
        return Err(FabricError::Handshake(format!("client speaks protocol version {v}, this build {VERSION}")));
    }
    let ns = nonce()?;
    let proof = hmac_parts(secret, &[b"ws-server", &h, &ns]);
    let mut ch = [0u8; 64];
    ch[..32].copy_from_slice(&ns);
    ch[32..].copy_from_slice(&proof);
    timed("sending the challenge", s.write_all(&ch)).await?;
    let mut theirs = [0u8; 32];
    timed("reading the proof", s.read_exact(&mut theirs)).await?;
    let mut m = HmacSha256::new_from_slice(secret).expect("any key length");
    m.update(b"ws-client");
    m.update(&h);
    m.update(&ns);
    m.verify_slice(&theirs).map_err(|_| FabricError::Auth("the client does not know the cluster secret".into()))?;
    timed("accepting", s.write_all(b"WSOK")).await?;
    let hello = Hello { role: h[6], position: u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) };
    Ok((hello, keys(secret, &h, &ns, false)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame {
            kind: Kind::Grads,
            dtype: Dtype::F32,
            step: 7,
            use_index: 3,
            layer: 2,
            offset: 8,
            total: 24,
            payload: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
        }
    }

    fn roundtrip(f: &Frame, key: &MacKey, seq: u64, mac_payload: bool) -> Result<Frame, FabricError> {
        let h = encode_header(f, seq, key, mac_payload);
        let hd = decode_header(&h, 1 << 20)?;
        verify(&hd, &h, &f.payload, key, seq)?;
        Ok(frame_of(&hd, f.payload.clone()))
    }

    #[test]
    fn a_frame_survives_encoding_with_and_without_a_payload_mac() {
        let key = MacKey::new(b"k");
        for mac_payload in [false, true] {
            assert_eq!(roundtrip(&sample(), &key, 5, mac_payload).unwrap(), sample());
        }
    }

    #[test]
    fn replays_forgeries_and_corruption_are_refused() {
        let key = MacKey::new(b"k");
        let f = sample();
        let h = encode_header(&f, 5, &key, false);
        let hd = decode_header(&h, 1 << 20).unwrap();
        // A replay: the same bytes when sequence 6 is due.
        assert!(verify(&hd, &h, &f.payload, &key, 6).unwrap_err().to_string().contains("sequence"));
        // Another connection's key.
        assert!(verify(&hd, &h, &f.payload, &MacKey::new(b"other"), 5).unwrap_err().to_string().contains("MAC"));
        // A changed header field.
        let mut h2 = h;
        h2[16] ^= 1;
        let hd2 = decode_header(&h2, 1 << 20).unwrap();
        assert!(verify(&hd2, &h2, &f.payload, &key, 5).is_err());
        // A changed payload byte: the checksum (header MAC only) or the MAC (with the payload).
        let mut p = f.payload.to_vec();
        p[0] ^= 1;
        assert!(verify(&hd, &h, &p, &key, 5).unwrap_err().to_string().contains("checksum"));
        let hm = encode_header(&f, 5, &key, true);
        let hdm = decode_header(&hm, 1 << 20).unwrap();
        assert!(verify(&hdm, &hm, &p, &key, 5).unwrap_err().to_string().contains("MAC"));
    }

    #[test]
    fn malformed_headers_are_refused_by_field() {
        let key = MacKey::new(b"k");
        let h = encode_header(&sample(), 0, &key, false);
        let with = |i: usize, v: u8| {
            let mut x = h;
            x[i] = v;
            decode_header(&x, 1 << 20).unwrap_err().to_string()
        };
        assert!(with(0, b'X').contains("magic"));
        assert!(with(4, 9).contains("version"));
        assert!(with(5, 99).contains("kind"));
        assert!(with(6, 99).contains("dtype"));
        assert!(with(7, 0x80).contains("flags"));
        assert!(with(49, 1).contains("limit") || with(49, 1).contains("past"));
        assert!(decode_header(&h[..40], 1 << 20).unwrap_err().to_string().contains("40 bytes"));
        // Oversized against the connection's limit.
        assert!(decode_header(&h, 4).unwrap_err().to_string().contains("above the limit"));
        // An element split by the chunk boundary.
        let mut odd = sample();
        odd.payload = Bytes::from_static(&[1, 2, 3]);
        odd.offset = 0;
        odd.total = 3;
        let ho = encode_header(&odd, 0, &key, false);
        assert!(decode_header(&ho, 1 << 20).unwrap_err().to_string().contains("splits"));
    }

    #[test]
    fn whole_frames_decode_and_truncations_are_refused() {
        let key = MacKey::new(b"k");
        let f = sample();
        let mut bytes = encode_header(&f, 3, &key, true).to_vec();
        bytes.extend_from_slice(&f.payload);
        assert_eq!(decode_frame(&bytes, &key, 3, 1 << 20).unwrap(), f);
        for cut in [0, 10, HEADER_BYTES, bytes.len() - 1] {
            assert!(decode_frame(&bytes[..cut], &key, 3, 1 << 20).unwrap_err().to_string().contains("truncated"));
        }
    }

    /// A deterministic stand-in for the fuzz target (fuzz/): random and
    /// mutated headers never panic the decoder.
    #[test]
    fn random_and_mutated_headers_never_panic() {
        let key = MacKey::new(b"k");
        let good = encode_header(&sample(), 0, &key, false);
        let mut x = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..200_000 {
            let mut h = if i % 2 == 0 { good } else { [0u8; HEADER_BYTES] };
            for _ in 0..(next() % 8) {
                let at = (next() % HEADER_BYTES as u64) as usize;
                h[at] = next() as u8;
            }
            if let Ok(hd) = decode_header(&h, 1 << 20) {
                let _ = verify(&hd, &h, &[], &key, 0);
            }
        }
    }

    #[tokio::test]
    async fn the_handshake_admits_the_secret_and_refuses_others() {
        for (client_secret, ok) in [(&b"0123456789abcdef-cluster"[..], true), (&b"0123456789abcdef-wrong!!"[..], false)]
        {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let server = tokio::spawn(async move { handshake_server(&mut b, b"0123456789abcdef-cluster").await });
            let client = handshake_client(&mut a, client_secret, Hello { role: 2, position: 5 }).await;
            // A refused client hangs up; the server must not wait for its proof.
            drop(a);
            let server = server.await.unwrap();
            assert_eq!(client.is_ok(), ok);
            assert_eq!(server.is_ok(), ok);
            if let (Ok(c), Ok((hello, s))) = (client, server) {
                assert_eq!(hello, Hello { role: 2, position: 5 });
                // The client's send key is the server's receive key.
                let f = sample();
                let h = encode_header(&f, 0, &c.send, false);
                verify(&decode_header(&h, 1 << 20).unwrap(), &h, &f.payload, &s.recv, 0).unwrap();
                assert!(verify(&decode_header(&h, 1 << 20).unwrap(), &h, &f.payload, &s.send, 0).is_err());
            }
        }
    }
}
