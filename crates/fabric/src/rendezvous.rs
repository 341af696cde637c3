//! How separate processes form one tree: every fabric node and worker
//! connects to the store (the coordinator), proves the cluster secret and
//! asks to join; once the tree's shape is filled (`inner` nodes, N
//! workers), the store assigns positions in the order peers joined and
//! tells each its parent's address; then every child connects to its
//! parent, naming its position, as in a tree built inside one process.
//!
//! The messages are `Control` frames holding JSON ([`Join`], [`Assignment`],
//! or `{"refused": reason}`). A node advertises its listener as its own
//! address on the connection to the store (the address the cluster's
//! network reaches) with its listening port. The store's address for its
//! child is likewise the one that child used to reach it.
//!
//! Limits: a joiner has `JOIN_MESSAGE_TIMEOUT` to send its request; joins
//! beyond the tree's shape are refused with a reason; the whole rendezvous
//! has the caller's deadline.

use crate::tcp::{self, Listener, TcpOptions};
use crate::topology::{Role, Tree};
use crate::wire::Hello;
use crate::{FabricError, Frame, Kind, Link};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const ROLE_NODE: u8 = 1;
pub const ROLE_WORKER: u8 = 2;
/// The position a joiner names before it has one.
pub const UNASSIGNED: u32 = u32::MAX;
pub const JOIN_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest control message accepted.
pub const CONTROL_BYTES_MAX: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// A node's listener (host:port) for its children; `None` for a worker.
    pub listen_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub position: u32,
    /// host:port of the parent to connect to, naming `position`.
    pub parent: String,
    pub workers: usize,
    pub fanout: usize,
    /// The run's configuration (TOML), for workers to build the same model and data.
    pub run: String,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Reply {
    Assigned(Assignment),
    Refused { refused: String },
}

fn control<T: Serialize>(msg: &T) -> Frame {
    let b = serde_json::to_vec(msg).expect("control messages serialize");
    Frame { total: b.len() as u64, payload: Bytes::from(b), ..Frame::control(Kind::Control) }
}

async fn recv_control(link: &mut Link, what: &str) -> Result<Vec<u8>, FabricError> {
    let f = match tokio::time::timeout(JOIN_MESSAGE_TIMEOUT, link.rx.recv()).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(FabricError::Closed(format!("{what}: the peer hung up"))),
        Err(_) => return Err(FabricError::Protocol(format!("{what}: nothing within {JOIN_MESSAGE_TIMEOUT:?}"))),
    };
    if f.kind != Kind::Control || f.payload.len() > CONTROL_BYTES_MAX {
        return Err(FabricError::Protocol(format!("{what}: a {:?} frame of {} bytes", f.kind, f.payload.len())));
    }
    Ok(f.payload.to_vec())
}

struct Joined {
    link: Link,
    /// The store's address as this joiner reached it.
    store_addr: std::net::SocketAddr,
    /// A node's listener, as host:port.
    listen: Option<String>,
}

/// One joiner's request, or `None` for a peer that was refused (logged).
async fn accept_join(listener: &Listener) -> Result<Option<(u8, Joined)>, FabricError> {
    let (mut link, hello, from, local) = listener.accept_with_local().await?;
    if hello.position != UNASSIGNED {
        tracing::warn!("{from} named position {} before the tree was formed; refused", hello.position);
        return Ok(None);
    }
    let join: Join = match recv_control(&mut link, "a join request")
        .await
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| FabricError::Protocol(format!("a join request: {e}"))))
    {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!("{from}: {e}");
            return Ok(None);
        }
    };
    match (hello.role, join.listen_port) {
        (ROLE_NODE, Some(port)) => {
            let listen = Some(std::net::SocketAddr::new(from.ip(), port).to_string());
            Ok(Some((ROLE_NODE, Joined { link, store_addr: local, listen })))
        }
        (ROLE_WORKER, None) => Ok(Some((ROLE_WORKER, Joined { link, store_addr: local, listen: None }))),
        (role, port) => {
            let why = format!("role {role} with listener port {port:?} is not a node or a worker");
            let _ = link.tx.send(control(&Reply::Refused { refused: why.clone() })).await;
            tracing::warn!("{from}: {why}");
            Ok(None)
        }
    }
}

async fn refuse(j: Joined, why: &str) {
    let _ = j.link.tx.send(control(&Reply::Refused { refused: why.to_string() })).await;
}

/// The node positions that separate processes take when the store runs
/// the top `hosted` nodes itself (positions 1..=hosted: numbered from the
/// top down, so each hosted node's parent is the store or hosted too).
pub fn process_nodes(tree: &Tree, hosted: usize) -> std::ops::RangeInclusive<usize> {
    1 + hosted.min(tree.inner_nodes())..=tree.inner_nodes()
}

/// How many fabric node processes a tree needs when the store hosts `hosted` nodes.
pub fn node_processes(tree: &Tree, hosted: usize) -> usize {
    process_nodes(tree, hosted).count()
}

/// Accepts the children of `me` (their hellos name their positions), in child order.
async fn accept_children(listener: &Listener, tree: &Tree, me: usize) -> Result<Vec<Link>, FabricError> {
    let children = &tree.positions[me].children;
    let mut got: Vec<Option<Link>> = (0..children.len()).map(|_| None).collect();
    while got.iter().any(Option::is_none) {
        let (link, hello, from) = listener.accept().await?;
        match children.iter().position(|&c| c == hello.position as usize) {
            Some(i) if got[i].is_none() => got[i] = Some(link),
            _ => tracing::warn!("{from} named position {}, not a free child of {me}; refused", hello.position),
        }
    }
    Ok(got.into_iter().map(|l| l.expect("all accepted")).collect())
}

/// Assigns positions in join order (nodes top first, workers by index),
/// tells everyone, and returns the data link of the store's one child. The
/// store runs nodes 1..=`hosted` itself (the top node with
/// `fabric.top_in_store`; more when node processes are missing after a
/// loss: the store takes the lost nodes' children): their children connect
/// to the store, and the link returned is in-process.
async fn form(
    listener: &Listener,
    tree: &Tree,
    nodes: Vec<Joined>,
    workers: Vec<Joined>,
    run: &str,
    hosted: usize,
) -> Result<Link, FabricError> {
    let hosted = hosted.min(tree.inner_nodes());
    assert!(nodes.len() == node_processes(tree, hosted) && workers.len() == tree.workers);
    let mut joined: Vec<(usize, Joined)> = process_nodes(tree, hosted)
        .zip(nodes)
        .chain((0..tree.workers).map(|w| tree.worker_position(w)).zip(workers))
        .collect();
    let mut listen = vec![None; tree.positions.len()];
    for (p, j) in &joined {
        listen[*p] = j.listen.clone();
    }
    for (p, j) in joined.iter_mut() {
        let parent = tree.positions[*p].parent.expect("not the store");
        let at_store = parent <= hosted;
        let addr = if at_store { j.store_addr.to_string() } else { listen[parent].clone().expect("nodes listen") };
        let a = Assignment {
            position: *p as u32,
            parent: addr,
            workers: tree.workers,
            fanout: tree.fanout,
            run: run.to_string(),
        };
        j.link.tx.send(control(&Reply::Assigned(a))).await?;
    }
    drop(joined);
    if hosted > 0 {
        return host_nodes(listener, tree, hosted).await;
    }
    let top = tree.positions[0].children[0];
    loop {
        let (link, hello, from) = listener.accept().await?;
        if hello.position as usize == top {
            return Ok(link);
        }
        tracing::warn!("{from} named position {}, not the store's child {top}; refused", hello.position);
    }
}

/// Runs nodes 1..=`hosted` in this process: accepts their children that are
/// processes (each names its position), links hosted parents to hosted
/// children in process, starts the nodes, and returns the store's link to
/// the top node.
async fn host_nodes(listener: &Listener, tree: &Tree, hosted: usize) -> Result<Link, FabricError> {
    // Every child of a hosted node that is not hosted itself connects here.
    let remote: Vec<usize> =
        (1..=hosted).flat_map(|n| tree.positions[n].children.iter().copied()).filter(|&c| c > hosted).collect();
    let mut links: Vec<Option<Link>> = (0..tree.positions.len()).map(|_| None).collect();
    let mut missing = remote.len();
    while missing > 0 {
        let (link, hello, from) = listener.accept().await?;
        let p = hello.position as usize;
        if remote.contains(&p) && links[p].is_none() {
            links[p] = Some(link);
            missing -= 1;
        } else {
            tracing::warn!("{from} named position {p}, not a free child of a node the store runs; refused");
        }
    }
    // Parent ends of in-process links: for the store (the top node's
    // parent) and for each hosted node's hosted children.
    let mut up: Vec<Option<Link>> = (0..tree.positions.len()).map(|_| None).collect();
    let (root, top) = crate::link::inproc_pair(listener.credits(), "store", "node 1");
    up[1] = Some(top);
    for n in 2..=hosted {
        let parent = tree.positions[n].parent.expect("a node has a parent");
        let (down, child_up) =
            crate::link::inproc_pair(listener.credits(), &format!("node {parent}"), &format!("node {n}"));
        links[n] = Some(down);
        up[n] = Some(child_up);
    }
    for (n, parent) in up.iter_mut().enumerate().take(hosted + 1).skip(1) {
        let children = tree.positions[n].children.iter().map(|&c| links[c].take().expect("linked above")).collect();
        let parent = parent.take().expect("linked above");
        tokio::spawn(async move {
            if let Err(e) = crate::node::run(parent, children, format!("node {n} (in the store)")).await {
                tracing::warn!("{e}");
            }
        });
    }
    Ok(root)
}

fn not_formed(deadline: Duration, what: String) -> FabricError {
    FabricError::Io(format!("the tree did not form within {deadline:?}: {what}"))
}

/// The store's side: admits joiners until the tree is full, assigns them
/// positions, and returns the data link of the store's one child.
pub async fn admit(
    listener: &Listener,
    tree: &Tree,
    run: &str,
    top_in_store: bool,
    deadline: Duration,
    mut on_join: impl FnMut(&str),
) -> Result<Link, FabricError> {
    let hosted = usize::from(top_in_store);
    let want_nodes = node_processes(tree, hosted);
    let work = async {
        let (mut nodes, mut workers): (Vec<Joined>, Vec<Joined>) = (Vec::new(), Vec::new());
        while nodes.len() < want_nodes || workers.len() < tree.workers {
            let Some((role, j)) = accept_join(listener).await? else { continue };
            let (list, want) = if role == ROLE_NODE { (&mut nodes, want_nodes) } else { (&mut workers, tree.workers) };
            if list.len() == want {
                refuse(j, &format!("the tree is full ({want_nodes} nodes, {} workers)", tree.workers)).await;
                continue;
            }
            on_join(&format!("a {} joined", if role == ROLE_NODE { "fabric node" } else { "worker" }));
            list.push(j);
        }
        form(listener, tree, nodes, workers, run, hosted).await
    };
    let need = format!("it needs {want_nodes} fabric nodes and {} workers to join", tree.workers);
    tokio::time::timeout(deadline, work).await.map_err(|_| not_formed(deadline, need))?
}

/// The store's side after the tree lost a member: admits whoever joins
/// (the survivors rejoin, replacements may come) until `quiet` passes with
/// no new joiner, then forms the largest tree of at most `workers_max`
/// workers that `fits`, and refuses the rest. Fewer node processes than the
/// tree needs never cost workers: the store runs the missing nodes itself
/// (from the top down), so their children connect to it.
pub async fn admit_survivors(
    listener: &Listener,
    fanout: usize,
    workers_max: usize,
    fits: &(dyn Fn(usize) -> bool + Sync),
    run: &str,
    top_in_store: bool,
    quiet: Duration,
    deadline: Duration,
) -> Result<(Tree, Link), FabricError> {
    let work = async {
        let (mut nodes, mut workers): (Vec<Joined>, Vec<Joined>) = (Vec::new(), Vec::new());
        loop {
            match tokio::time::timeout(quiet, accept_join(listener)).await {
                Ok(r) => match r? {
                    Some((ROLE_NODE, j)) => nodes.push(j),
                    Some((_, j)) => workers.push(j),
                    None => {}
                },
                Err(_) if !workers.is_empty() => break,
                Err(_) => {}
            }
        }
        let shape =
            (1..=workers.len().min(workers_max)).rev().find_map(|w| Tree::new(w, fanout).ok().filter(|_| fits(w)));
        let Some(tree) = shape else {
            let why = format!("{} workers and {} nodes make no tree this run can use", workers.len(), nodes.len());
            for j in nodes.into_iter().chain(workers) {
                refuse(j, &why).await;
            }
            return Err(FabricError::Protocol(why));
        };
        // The store hosts the top node if asked to, and as many more from
        // the top as there are node processes missing.
        let inner = tree.inner_nodes();
        let hosted = usize::from(top_in_store).max(inner.saturating_sub(nodes.len())).min(inner);
        let want_nodes = node_processes(&tree, hosted);
        if hosted > usize::from(top_in_store) {
            tracing::warn!(
                "{} fabric node processes for {inner} places: the store runs {hosted} nodes itself",
                nodes.len()
            );
        }
        for j in nodes.drain(want_nodes..).chain(workers.drain(tree.workers..)) {
            refuse(j, "the tree formed again without this process").await;
        }
        let link = form(listener, &tree, nodes, workers, run, hosted).await?;
        Ok((tree, link))
    };
    tokio::time::timeout(deadline, work).await.map_err(|_| not_formed(deadline, "no worker rejoined".into()))?
}

/// A node's or worker's side: joins the store at `store` and returns its assignment.
pub async fn join(
    store: &str,
    opts: &TcpOptions,
    role: u8,
    listen_port: Option<u16>,
    deadline: Duration,
) -> Result<Assignment, FabricError> {
    let mut link = tcp::connect(store, opts, Hello { role, position: UNASSIGNED }, deadline).await?;
    link.tx.send(control(&Join { listen_port })).await?;
    // The store answers once everyone has joined: wait as long as the deadline allows.
    let f = tokio::time::timeout(deadline, link.rx.recv())
        .await
        .map_err(|_| FabricError::Io(format!("the store at {store} assigned no position within {deadline:?}")))?
        .ok_or_else(|| FabricError::Closed(format!("the store at {store} hung up before assigning a position")))?;
    if f.kind != Kind::Control || f.payload.len() > CONTROL_BYTES_MAX {
        return Err(FabricError::Protocol(format!("a {:?} frame instead of an assignment", f.kind)));
    }
    match serde_json::from_slice(&f.payload) {
        Ok(Reply::Assigned(a)) => Ok(a),
        Ok(Reply::Refused { refused }) => {
            Err(FabricError::Protocol(format!("the store refused to add this process: {refused}")))
        }
        Err(e) => Err(FabricError::Protocol(format!("an assignment: {e}"))),
    }
}

/// Runs a fabric node process's part once assigned: connects to its parent
/// and accepts its children (at the same time), then forwards and sums
/// until the run ends.
pub async fn run_node(
    a: &Assignment,
    listener: &Listener,
    opts: &TcpOptions,
    deadline: Duration,
) -> Result<(), FabricError> {
    let tree = Tree::new(a.workers, a.fanout).map_err(FabricError::Protocol)?;
    let me = a.position as usize;
    if me >= tree.positions.len() || tree.positions[me].role != Role::Node {
        return Err(FabricError::Protocol(format!("position {me} is not a fabric node of this tree")));
    }
    let up = tcp::connect(&a.parent, opts, Hello { role: ROLE_NODE, position: a.position }, deadline);
    let down = accept_children(listener, &tree, me);
    let (up, down) = tokio::join!(up, tokio::time::timeout(deadline, down));
    let down =
        down.map_err(|_| FabricError::Io(format!("node {me}: its children did not connect within {deadline:?}")))??;
    crate::node::run(up?, down, format!("node {me}")).await
}
