//! `weightstream bench fabric`: the broadcast-reduce tree's throughput and
//! latency, with raw TCP between two processes measured in the same run.
//!
//! - Broadcast: the store's end sends `bytes` of weight chunks; the time
//!   runs until every worker has all of them.
//! - Reduce: every worker sends `bytes` of f32 gradient chunks; the nodes
//!   sum them; the time runs until the store's end has the sum.
//! - Raw TCP: this process writes `bytes` to a child process over loopback
//!   in chunk-sized writes and waits for its one-byte acknowledgement.
//! - `--latency`: one step of a lightweight worker (a pass start and one
//!   4 KiB weight chunk down, one 4 KiB gradient chunk up and summed) for
//!   N = 1, 2, 4, ... up to `--workers`, median of many steps.
//!
//! The workers are tasks that skip compute: this measures the fabric. The
//! whole tree runs in this one process, on a runtime of `--threads` threads
//! (one per core by default), so that on a machine with cores to spare
//! every edge's copies can run at once, as in separate processes.

use crate::bench::{median, round};
use bytes::Bytes;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use ws_fabric::{Dtype, Frame, Kind, PassStart, Tree};
use ws_train::fabric::{build_tree, fabric_error};
use ws_train::{RunConfig, TrainError};

type Result<T> = std::result::Result<T, TrainError>;

fn config(workers: usize, fanout: usize, transport: &str, chunk_bytes: usize, flags: Flags) -> Result<RunConfig> {
    let mut c = RunConfig::preset("tiny")?;
    c.fabric.mac_payload = flags.mac_payload;
    c.fabric.top_in_store = flags.top_in_store;
    c.fabric.workers = workers;
    c.fabric.fanout = fanout;
    c.fabric.transport = transport.into();
    c.fabric.chunk_bytes = chunk_bytes;
    c.train.batch_size = workers;
    c.validate()?;
    Ok(c)
}

fn chunk_frame(kind: Kind, i: u64, chunk: &Bytes, total: u64) -> Frame {
    Frame {
        kind,
        dtype: Dtype::F32,
        step: 0,
        use_index: 0,
        layer: 0,
        offset: i * chunk.len() as u64,
        total,
        payload: chunk.clone(),
    }
}

/// Broadcast and reduce bytes per second through the tree, `repeats` times each.
fn throughput(c: &RunConfig, bytes: usize, repeats: usize, threads: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let tree = Tree::new(c.fabric.workers, c.fabric.fanout).map_err(TrainError::Config)?;
    let rt = runtime(threads)?;
    let (root, leaves) = build_tree(&tree, c, &rt)?;
    let chunk = Bytes::from(vec![0u8; c.fabric.chunk_bytes]);
    let frames = bytes.div_ceil(chunk.len()) as u64;
    let total = frames * chunk.len() as u64;
    let (done_tx, mut done_rx) = mpsc::channel::<()>(leaves.len());
    let (go_tx, go_rx) = watch::channel(0usize);
    let mut tasks = Vec::new();
    for leaf in leaves {
        let (done, mut go, chunk) = (done_tx.clone(), go_rx.clone(), chunk.clone());
        tasks.push(rt.spawn(async move {
            let ws_fabric::Link { tx, mut rx } = leaf;
            for r in 0..repeats {
                let mut got = 0u64;
                while got < total {
                    let Some(f) = rx.recv().await else { return };
                    got += f.payload.len() as u64;
                }
                let _ = done.send(()).await;
                while *go.borrow_and_update() <= r {
                    if go.changed().await.is_err() {
                        return;
                    }
                }
                for i in 0..frames {
                    if tx.send(chunk_frame(Kind::Grads, i, &chunk, total)).await.is_err() {
                        return;
                    }
                }
            }
            // Stay until the run ends, as a worker does.
            while let Some(f) = rx.recv().await {
                if f.kind == Kind::Shutdown {
                    break;
                }
            }
        }));
    }
    let workers = c.fabric.workers;
    rt.block_on(async move {
        let ws_fabric::Link { tx, mut rx } = root;
        let (mut down, mut up) = (Vec::new(), Vec::new());
        for r in 0..repeats {
            let t0 = Instant::now();
            for i in 0..frames {
                tx.send(chunk_frame(Kind::Weights, i, &chunk, total)).await.map_err(fabric_error)?;
            }
            for _ in 0..workers {
                done_rx.recv().await.ok_or_else(|| TrainError::Config("a worker stopped".into()))?;
            }
            down.push(total as f64 / t0.elapsed().as_secs_f64());
            let t1 = Instant::now();
            let _ = go_tx.send(r + 1);
            let mut got = 0u64;
            while got < total {
                let f = rx.recv().await.ok_or_else(|| TrainError::Config("the tree closed".into()))?;
                got += f.payload.len() as u64;
            }
            up.push(total as f64 / t1.elapsed().as_secs_f64());
        }
        let _ = tx.send(Frame::control(Kind::Shutdown)).await;
        // The tree ends in order before the runtime goes.
        for t in tasks {
            let _ = t.await;
        }
        while rx.recv().await.is_some() {}
        Ok((down, up))
    })
}

/// Runtime threads for `--threads` (0: one per core).
fn runtime_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    ws_train::fabric::runtime_with(runtime_threads(threads))
}

/// Median microseconds of a lightweight step through a tree of `workers`.
fn step_latency(c: &RunConfig, steps: usize, threads: usize) -> Result<f64> {
    let tree = Tree::new(c.fabric.workers, c.fabric.fanout).map_err(TrainError::Config)?;
    let rt = runtime(threads)?;
    let (root, leaves) = build_tree(&tree, c, &rt)?;
    let chunk = Bytes::from(vec![0u8; 4096]);
    let mut tasks = Vec::new();
    for leaf in leaves {
        let chunk = chunk.clone();
        tasks.push(rt.spawn(async move {
            let ws_fabric::Link { tx, mut rx } = leaf;
            while let Some(f) = rx.recv().await {
                if f.kind == Kind::Shutdown {
                    return;
                }
                if f.kind == Kind::Weights && tx.send(chunk_frame(Kind::Grads, 0, &chunk, 4096)).await.is_err() {
                    return;
                }
            }
        }));
    }
    rt.block_on(async move {
        let ws_fabric::Link { tx, mut rx } = root;
        let mut times = Vec::with_capacity(steps);
        for s in 0..steps + 10 {
            let t0 = Instant::now();
            tx.send(Frame::begin(PassStart { training: true, index: s as u64 })).await.map_err(fabric_error)?;
            tx.send(chunk_frame(Kind::Weights, 0, &chunk, 4096)).await.map_err(fabric_error)?;
            rx.recv().await.ok_or_else(|| TrainError::Config("the tree closed".into()))?;
            if s >= 10 {
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        let _ = tx.send(Frame::control(Kind::Shutdown)).await;
        for t in tasks {
            let _ = t.await;
        }
        while rx.recv().await.is_some() {}
        Ok(median(times))
    })
}

/// Raw TCP from this process to a child process: bytes per second per repeat.
fn raw_tcp(bytes: usize, chunk: usize, repeats: usize) -> Result<Vec<f64>> {
    let io = |e: std::io::Error| TrainError::Config(format!("raw TCP: {e}"));
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = l.local_addr().map_err(io)?.to_string();
    let exe = std::env::current_exe().map_err(io)?;
    let mut child = std::process::Command::new(exe)
        .args(["bench", "tcp-sink", "--addr", &addr, "--bytes", &bytes.to_string(), "--repeats", &repeats.to_string()])
        .spawn()
        .map_err(io)?;
    let (mut s, _) = l.accept().map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let buf = vec![0u8; chunk];
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.min(bytes - sent);
            s.write_all(&buf[..n]).map_err(io)?;
            sent += n;
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).map_err(io)?;
        rates.push(bytes as f64 / t0.elapsed().as_secs_f64());
    }
    drop(s);
    let _ = child.wait();
    Ok(rates)
}

/// The child of [`raw_tcp`]: reads `bytes` per repeat and acknowledges each.
pub fn tcp_sink(addr: &str, bytes: usize, repeats: usize) -> Result<()> {
    let io = |e: std::io::Error| TrainError::Config(format!("tcp-sink: {e}"));
    let mut s = std::net::TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..repeats {
        let mut got = 0;
        while got < bytes {
            let n = s.read(&mut buf[..(bytes - got).min(1 << 20)]).map_err(io)?;
            if n == 0 {
                return Err(TrainError::Config("tcp-sink: the sender hung up".into()));
            }
            got += n;
        }
        s.write_all(&[1]).map_err(io)?;
    }
    Ok(())
}

/// Switches of `bench fabric`.
#[derive(Clone, Copy)]
pub struct Flags {
    pub latency: bool,
    pub mac_payload: bool,
    pub top_in_store: bool,
    /// Runtime threads for the whole tree; 0: one per core.
    pub threads: usize,
}

pub fn run(
    workers: usize,
    fanout: usize,
    bytes: usize,
    transport: &str,
    chunk_bytes: usize,
    repeats: usize,
    flags: Flags,
) -> Result<()> {
    if flags.latency {
        let mut n = 1;
        while n <= workers {
            let c = config(n, fanout, transport, chunk_bytes, flags)?;
            let depth = Tree::new(n, fanout).map_err(TrainError::Config)?.depth();
            let us = step_latency(&c, 200, flags.threads)?;
            println!(
                "{}",
                serde_json::json!({"bench": "fabric-latency", "workers": n, "fanout": fanout, "transport": transport,
                    "depth": depth, "step_latency_us": round(us), "threads": runtime_threads(flags.threads)})
            );
            n *= 2;
        }
        return Ok(());
    }
    let c = config(workers, fanout, transport, chunk_bytes, flags)?;
    let tcp = raw_tcp(bytes, chunk_bytes, repeats)?;
    let (down, up) = throughput(&c, bytes, repeats, flags.threads)?;
    let (tcp, down, up) = (median(tcp), median(down), median(up));
    // Every network edge of the tree carries all the bytes; on one machine
    // they all share its cores, so the per-edge rate is what compares with
    // one stream. (The store's in-process link to a top node it runs is not one.)
    let t = Tree::new(workers, fanout).map_err(TrainError::Config)?;
    let edges = t.positions.len() - 1 - usize::from(flags.top_in_store && t.inner_nodes() > 0);
    println!(
        "{}",
        serde_json::json!({"bench": "fabric", "workers": workers, "fanout": fanout, "transport": transport,
            "bytes": bytes, "chunk_bytes": chunk_bytes, "repeats": repeats, "mac_payload": flags.mac_payload, "top_in_store": flags.top_in_store,
            "broadcast_bytes_per_s": round(down), "reduce_bytes_per_s": round(up), "tcp_bytes_per_s": round(tcp),
            "broadcast_vs_tcp": round(down / tcp), "reduce_vs_tcp": round(up / tcp), "edges": edges,
            "broadcast_edge_bytes_per_s_vs_tcp": round(edges as f64 * down / tcp),
            "reduce_edge_bytes_per_s_vs_tcp": round(edges as f64 * up / tcp), "threads": runtime_threads(flags.threads)})
    );
    Ok(())
}
