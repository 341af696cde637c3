//! The broadcast-reduce fabric (DESIGN.md, "The fabric"; their SwarmX): a
//! tree with the store at the root, broadcast-reduce nodes inside and
//! data-parallel workers at the leaves. Weights flow down in chunks, each
//! forwarded to every child as it arrives; gradients flow up, each node
//! summing its children's chunks in fp32 in child order (never arrival
//! order) and forwarding the sum.
//!
//! What is here: the tree's shape ([`topology`]), the wire format and the
//! authenticated handshake ([`wire`]), links with credit-based flow control
//! over in-process channels or TCP ([`link`], [`tcp`]), the node itself
//! ([`node`]), and message chunking ([`chunk`]). The node code is the same
//! over every transport: it sees [`link::Link`]s.
//!
//! What is not: what a step means. The store and the workers (ws-train)
//! put schedule uses into frames and take them out; the fabric checks that
//! the children it sums agree on every header field (paired assertions).

pub mod chunk;
pub mod link;
pub mod node;
pub mod rendezvous;
pub mod sim;
pub mod tcp;
pub mod topology;
pub mod wire;

pub use link::{Link, LinkRx, LinkTx};
pub use topology::Tree;
pub use wire::{Dtype, Frame, Kind, PassStart};

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum FabricError {
    /// A frame that fails its checks (format, limits, MAC, sequence, checksum).
    #[error("refused a frame: {0}")]
    Frame(String),
    /// Frames that are well formed but break the protocol (children that disagree, a credit overrun).
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The other end of a link went away.
    #[error("link closed: {0}")]
    Closed(String),
    #[error("{0}")]
    Io(String),
}
