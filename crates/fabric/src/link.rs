//! A link: one frame channel each way between a node and one neighbour,
//! with credit-based flow control. The sender may have at most `credits`
//! data frames in flight towards the receiver; the receiver hands a credit
//! back each time its owner takes a frame. In-process, the channel's
//! capacity is the credit (a bounded channel blocks at the same point); over
//! TCP, `Credit` frames carry it back (see [`crate::tcp`]).
//!
//! Both halves are awaited (`send`, `recv`) under any executor: the nodes
//! on tokio, the store's and the workers' loops on threads of their own or
//! in the single-threaded simulator.

use crate::{FabricError, Frame};
use tokio::sync::mpsc;

/// The named limit on `fabric.chunks_in_flight`.
pub const CREDITS_MAX: usize = 1024;

pub struct LinkTx {
    tx: mpsc::Sender<Frame>,
    peer: String,
    /// Closes the connection at once, whatever it is waiting for.
    kill: Option<tokio::sync::watch::Sender<bool>>,
    /// Turns true when the connection is cut (in-process and simulated
    /// links, which have no task to close): a send waiting for room ends.
    cut: Option<tokio::sync::watch::Receiver<bool>>,
}

pub struct LinkRx {
    rx: mpsc::Receiver<Frame>,
    /// Where a taken frame's credit goes back (TCP); `None` in-process.
    credit: Option<mpsc::UnboundedSender<u32>>,
    /// Turns true when the peer is gone (TCP: end of stream, error, kill),
    /// even while frames already received wait to be taken.
    gone: Option<tokio::sync::watch::Receiver<bool>>,
}

pub struct Link {
    pub tx: LinkTx,
    pub rx: LinkRx,
}

impl LinkTx {
    pub(crate) fn new(tx: mpsc::Sender<Frame>, peer: String) -> LinkTx {
        LinkTx { tx, peer, kill: None, cut: None }
    }

    /// A TCP connection's: `kill` makes its tasks close the socket.
    pub(crate) fn with_kill(mut self, kill: tokio::sync::watch::Sender<bool>) -> LinkTx {
        self.kill = Some(kill);
        self
    }

    /// A connection without tasks of its own (in-process, simulated):
    /// `cut` turned on fails the sends, waiting ones included, and is its
    /// killer.
    pub(crate) fn with_cut(mut self, cut: tokio::sync::watch::Sender<bool>) -> LinkTx {
        self.cut = Some(cut.subscribe());
        self.kill = Some(cut);
        self
    }

    /// A handle that closes this link's connection from anywhere, even
    /// while a sender waits for credit: the peer sees it gone
    /// ([`LinkRx::peer_gone`]).
    pub fn killer(&self) -> Option<tokio::sync::watch::Sender<bool>> {
        self.kill.clone()
    }

    pub async fn send(&self, f: Frame) -> Result<(), FabricError> {
        let sent = match &self.cut {
            None => self.tx.send(f).await.is_ok(),
            Some(cut) => {
                let mut cut = cut.clone();
                tokio::select! {
                    biased;
                    _ = cut.wait_for(|&c| c) => false,
                    r = self.tx.send(f) => r.is_ok(),
                }
            }
        };
        if sent {
            Ok(())
        } else {
            Err(FabricError::Closed(self.peer.clone()))
        }
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl LinkRx {
    pub(crate) fn new(rx: mpsc::Receiver<Frame>, credit: Option<mpsc::UnboundedSender<u32>>) -> LinkRx {
        LinkRx { rx, credit, gone: None }
    }

    pub(crate) fn with_gone(mut self, gone: tokio::sync::watch::Receiver<bool>) -> LinkRx {
        self.gone = Some(gone);
        self
    }

    /// Resolves once the peer is known to be gone: a TCP connection ended,
    /// or a connection was killed. A peer that just drops its end of an
    /// in-process link closes the channel instead.
    pub fn peer_gone(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let gone = self.gone.clone();
        async move {
            let Some(mut g) = gone else { return std::future::pending().await };
            loop {
                if *g.borrow_and_update() {
                    return;
                }
                if g.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    fn taken(&self, f: &Frame) {
        if let Some(c) = &self.credit {
            if f.is_data() {
                // A closed writer means the connection is going away; the next recv says so.
                let _ = c.send(1);
            }
        }
    }

    /// The next frame, or `None` once the peer has closed its side.
    pub async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.taken(&f);
        Some(f)
    }
}

/// Two connected ends of an in-process link with `credits` frames of room each way.
pub fn inproc_pair(credits: usize, a_name: &str, b_name: &str) -> (Link, Link) {
    assert!((1..=CREDITS_MAX).contains(&credits));
    let (a_tx, b_rx) = mpsc::channel(credits);
    let (b_tx, a_rx) = mpsc::channel(credits);
    // Either end's killer cuts the link: both ends' sends fail, and both
    // see the peer gone.
    let (cut, gone) = tokio::sync::watch::channel(false);
    (
        Link {
            tx: LinkTx::new(a_tx, b_name.to_string()).with_cut(cut.clone()),
            rx: LinkRx::new(a_rx, None).with_gone(gone.clone()),
        },
        Link { tx: LinkTx::new(b_tx, a_name.to_string()).with_cut(cut), rx: LinkRx::new(b_rx, None).with_gone(gone) },
    )
}
