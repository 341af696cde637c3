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
    /// Node positions this node process runs besides its own: places no
    /// process took after a loss, each run by the process that runs its
    /// parent (descendants of `position`, parents before children).
    #[serde(default)]
    pub adopted: Vec<u32>,
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

/// How many fabric node processes a tree needs when the store runs its top
/// `hosted` nodes itself.
pub fn node_processes(tree: &Tree, hosted: usize) -> usize {
    tree.inner_nodes() - hosted.min(tree.inner_nodes())
}

/// Who runs a node position: the store, or the node process at a position
/// (the place's own process, or the one that adopted it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Store,
    Process(usize),
}

/// Where each node position runs (indexed by position; `None` for the
/// store and the workers). The store runs the top `store_runs` nodes; the
/// `processes` node processes take the next places from the top; a place
/// left over (the deepest ones, after a loss) is run by whoever runs its
/// parent, so the lost node's parent takes its children. Nodes are
/// numbered from the top, so a parent's host is known before its children's.
pub fn placement(tree: &Tree, store_runs: usize, processes: usize) -> Vec<Option<Host>> {
    let inner = tree.inner_nodes();
    let store_runs = store_runs.min(inner);
    let last_process = (store_runs + processes).min(inner);
    let mut host = vec![None; tree.positions.len()];
    for p in tree.nodes() {
        host[p] = Some(if p <= store_runs {
            Host::Store
        } else if p <= last_process {
            Host::Process(p)
        } else {
            match tree.positions[p].parent.expect("a node has a parent") {
                0 => Host::Store,
                q => host[q].expect("parents are placed first"),
            }
        });
    }
    host
}

/// Accepts one connection for each of `wanted` (their hellos name their
/// positions); returns the links in `wanted`'s order.
async fn accept_positions(listener: &Listener, wanted: &[usize], whose: &str) -> Result<Vec<Link>, FabricError> {
    let mut got: Vec<Option<Link>> = (0..wanted.len()).map(|_| None).collect();
    while got.iter().any(Option::is_none) {
        let (link, hello, from) = listener.accept().await?;
        match wanted.iter().position(|&c| c == hello.position as usize) {
            Some(i) if got[i].is_none() => got[i] = Some(link),
            _ => tracing::warn!("{from} named position {}, not a free child of {whose}; refused", hello.position),
        }
    }
    Ok(got.into_iter().map(|l| l.expect("all accepted")).collect())
}

/// The nodes a process runs, once [`run_here`] has linked them.
struct Local {
    /// The first position's children, in child order: the caller runs the
    /// first node on them and on its link to the parent elsewhere.
    first_children: Vec<Link>,
    /// The other nodes, running.
    others: Vec<tokio::task::JoinHandle<Result<(), FabricError>>>,
}

/// Links the nodes at `positions` (parents before children; the first's
/// parent is elsewhere, every other's is among them) in this process:
/// accepts their children that are elsewhere (each names its position),
/// joins the others to their parents in process, and starts every node but
/// the first.
async fn run_here(
    listener: &Listener,
    tree: &Tree,
    positions: &[usize],
    whose: &str,
    label: &str,
) -> Result<Local, FabricError> {
    let here = |p: usize| positions.contains(&p);
    let remote: Vec<usize> =
        positions.iter().flat_map(|&n| tree.positions[n].children.iter().copied()).filter(|&c| !here(c)).collect();
    let accepted = accept_positions(listener, &remote, whose).await?;
    let mut links: Vec<Option<Link>> = (0..tree.positions.len()).map(|_| None).collect();
    for (c, l) in remote.into_iter().zip(accepted) {
        links[c] = Some(l);
    }
    // In-process links from each local node to its local children.
    let mut up: Vec<Option<Link>> = (0..tree.positions.len()).map(|_| None).collect();
    for &n in &positions[1..] {
        let parent = tree.positions[n].parent.expect("a node has a parent");
        assert!(here(parent), "a local node's parent is local, but for the first");
        let (down, child_up) =
            crate::link::inproc_pair(listener.credits(), &format!("node {parent}"), &format!("node {n}"));
        links[n] = Some(down);
        up[n] = Some(child_up);
    }
    let children_of = |links: &mut Vec<Option<Link>>, n: usize| -> Vec<Link> {
        tree.positions[n].children.iter().map(|&c| links[c].take().expect("linked above")).collect()
    };
    let first_children = children_of(&mut links, positions[0]);
    let mut others = Vec::new();
    for &n in &positions[1..] {
        let (parent, children) = (up[n].take().expect("linked above"), children_of(&mut links, n));
        let name = format!("node {n} ({label})");
        others.push(tokio::spawn(crate::node::run(parent, children, name)));
    }
    Ok(Local { first_children, others })
}

/// Assigns positions in join order (nodes top first, workers by index),
/// tells everyone, and returns the data link of the store's one child.
/// `host` says where each node runs ([`placement`]): the store runs its
/// nodes itself (their children connect to the store, and the link returned
/// is in-process); a node process runs its own place and those it adopted,
/// whose children connect to it.
async fn form(
    listener: &Listener,
    tree: &Tree,
    nodes: Vec<Joined>,
    workers: Vec<Joined>,
    run: &str,
    host: &[Option<Host>],
) -> Result<Link, FabricError> {
    let own: Vec<usize> = tree.nodes().filter(|&p| host[p] == Some(Host::Process(p))).collect();
    assert!(nodes.len() == own.len() && workers.len() == tree.workers);
    let mut joined: Vec<(usize, Joined)> =
        own.iter().copied().zip(nodes).chain((0..tree.workers).map(|w| tree.worker_position(w)).zip(workers)).collect();
    let mut listen = vec![None; tree.positions.len()];
    for (p, j) in &joined {
        listen[*p] = j.listen.clone();
    }
    for (p, j) in joined.iter_mut() {
        let parent = tree.positions[*p].parent.expect("not the store");
        // The process that runs the parent: the store, or a node process.
        let addr = match (parent, host[parent]) {
            (_, Some(Host::Process(q))) => listen[q].clone().expect("nodes listen"),
            _ => j.store_addr.to_string(),
        };
        let adopted = tree.nodes().filter(|&x| x != *p && host[x] == Some(Host::Process(*p))).map(|x| x as u32);
        let a = Assignment {
            position: *p as u32,
            parent: addr,
            workers: tree.workers,
            fanout: tree.fanout,
            run: run.to_string(),
            adopted: adopted.collect(),
        };
        j.link.tx.send(control(&Reply::Assigned(a))).await?;
    }
    drop(joined);
    let in_store: Vec<usize> = tree.nodes().filter(|&p| host[p] == Some(Host::Store)).collect();
    if !in_store.is_empty() {
        return host_nodes(listener, tree, &in_store).await;
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

/// Runs the nodes at `in_store` (the top node first, parents before
/// children) in the store's process and returns the store's link to the
/// top node.
async fn host_nodes(listener: &Listener, tree: &Tree, in_store: &[usize]) -> Result<Link, FabricError> {
    let top = tree.positions[0].children[0];
    assert_eq!(in_store[0], top, "the store runs the top node when it runs any");
    let local = run_here(listener, tree, in_store, "a node the store runs", "in the store").await?;
    for h in local.others {
        tokio::spawn(async move {
            if let Ok(Err(e)) = h.await {
                tracing::warn!("{e}");
            }
        });
    }
    let (root, top_up) = crate::link::inproc_pair(listener.credits(), "store", &format!("node {top}"));
    let children = local.first_children;
    tokio::spawn(async move {
        if let Err(e) = crate::node::run(top_up, children, format!("node {top} (in the store)")).await {
            tracing::warn!("{e}");
        }
    });
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
        form(listener, tree, nodes, workers, run, &placement(tree, hosted, want_nodes)).await
    };
    let need = format!("it needs {want_nodes} fabric nodes and {} workers to join", tree.workers);
    tokio::time::timeout(deadline, work).await.map_err(|_| not_formed(deadline, need))?
}

/// The store's side after the tree lost a member: admits whoever joins
/// (the survivors rejoin, replacements may come) until `quiet` passes with
/// no new joiner, then forms the largest tree of at most `workers_max`
/// workers that `fits`, and refuses the rest. Fewer node processes than the
/// tree needs never cost workers: the node processes take the places from
/// the top, and each place left over is run by whoever runs its parent (a
/// node process, or the store), which takes its children. Returns the
/// tree, the store's link, and where each node runs ([`placement`]).
pub async fn admit_survivors(
    listener: &Listener,
    fanout: usize,
    workers_max: usize,
    fits: &(dyn Fn(usize) -> bool + Sync),
    run: &str,
    top_in_store: bool,
    quiet: Duration,
    deadline: Duration,
) -> Result<(Tree, Link, Vec<Option<Host>>), FabricError> {
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
        let store_runs = usize::from(top_in_store).min(tree.inner_nodes());
        let processes = nodes.len().min(node_processes(&tree, store_runs));
        let host = placement(&tree, store_runs, processes);
        for j in nodes.drain(processes..).chain(workers.drain(tree.workers..)) {
            refuse(j, "the tree formed again without this process").await;
        }
        let link = form(listener, &tree, nodes, workers, run, &host).await?;
        Ok((tree, link, host))
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
/// until the run ends. It also runs the places it adopted (descendants of
/// its own, parents first): their children connect here too, and
/// in-process links join them to their parents.
pub async fn run_node(
    a: &Assignment,
    listener: &Listener,
    opts: &TcpOptions,
    deadline: Duration,
) -> Result<(), FabricError> {
    let tree = Tree::new(a.workers, a.fanout).map_err(FabricError::Protocol)?;
    let me = a.position as usize;
    let mine: Vec<usize> = std::iter::once(me).chain(a.adopted.iter().map(|&x| x as usize)).collect();
    for (i, &p) in mine.iter().enumerate() {
        if p >= tree.positions.len() || tree.positions[p].role != Role::Node {
            return Err(FabricError::Protocol(format!("position {p} is not a fabric node of this tree")));
        }
        if i > 0 && !mine[..i].contains(&tree.positions[p].parent.expect("a node has a parent")) {
            return Err(FabricError::Protocol(format!("node {me} was given node {p}, whose parent it does not run")));
        }
    }
    if mine.len() > 1 {
        tracing::warn!("node {me}: also runs nodes {:?}, places no process took (it runs their parents)", &mine[1..]);
    }
    let up = tcp::connect(&a.parent, opts, Hello { role: ROLE_NODE, position: a.position }, deadline);
    let (whose, label) = (format!("node {me}"), format!("in node {me}'s process"));
    let down = run_here(listener, &tree, &mine, &whose, &label);
    let (up, down) = tokio::join!(up, tokio::time::timeout(deadline, down));
    let local =
        down.map_err(|_| FabricError::Io(format!("node {me}: its children did not connect within {deadline:?}")))??;
    let r = crate::node::run(up?, local.first_children, format!("node {me}")).await;
    // The adopted nodes end with this one (it is their parent or ancestor).
    for h in local.others {
        if let Ok(Err(e)) = h.await {
            if r.is_ok() {
                return Err(e);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Node processes take the places from the top; every place left over
    /// runs where its parent runs (the store's child, where the store runs).
    #[test]
    fn a_place_no_process_takes_runs_where_its_parent_runs() {
        for (n, f) in [(3, 2), (6, 4), (7, 2), (8, 2), (16, 4), (64, 4)] {
            let tree = Tree::new(n, f).unwrap();
            let inner = tree.inner_nodes();
            for store_runs in [0, 1] {
                for processes in 0..=node_processes(&tree, store_runs) {
                    let host = placement(&tree, store_runs, processes);
                    assert!(host[0].is_none() && (0..n).all(|w| host[tree.worker_position(w)].is_none()));
                    let own: Vec<usize> = tree.nodes().filter(|&p| host[p] == Some(Host::Process(p))).collect();
                    let top = store_runs.min(inner);
                    assert_eq!(own, (top + 1..=top + processes).collect::<Vec<_>>(), "processes take the top places");
                    for p in tree.nodes().filter(|&p| p > top + processes) {
                        let parent = tree.positions[p].parent.unwrap();
                        let want = if parent == 0 { Some(Host::Store) } else { host[parent] };
                        assert_eq!(host[p], want, "N {n} F {f}: place {p} runs where its parent {parent} runs");
                    }
                }
            }
        }
        // 3 workers at fan-out 2: top node 1 and node 2 below it.
        let tree = Tree::new(3, 2).unwrap();
        assert_eq!(placement(&tree, 0, 1)[1..=2], [Some(Host::Process(1)), Some(Host::Process(1))]);
        assert_eq!(placement(&tree, 0, 0)[1..=2], [Some(Host::Store), Some(Host::Store)]);
        assert_eq!(placement(&tree, 1, 0)[1..=2], [Some(Host::Store), Some(Host::Store)]);
    }
}
