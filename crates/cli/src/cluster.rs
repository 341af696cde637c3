//! The roles of a multi-process run: `weightstream fabric` (a
//! broadcast-reduce node), `weightstream worker`, and `weightstream cluster`,
//! which starts a store, the tree's nodes and N workers as processes on this
//! machine and stops them together. (`weightstream store` is `train` with
//! the fabric's processes joining over TCP; see main.rs.)
//!
//! Multi-machine runs are started by the cluster's scheduler instead (see
//! deploy/): each process gets its role, the store's address and the secret.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ws_fabric::Tree;
use ws_train::{RunConfig, TrainError};

type Result<T> = std::result::Result<T, TrainError>;

/// What a node or worker knows before it joins: where its secret is.
fn local_config(secret_file: Option<&Path>) -> Result<RunConfig> {
    let mut c = RunConfig::preset("tiny")?;
    if let Some(f) = secret_file {
        c.fabric.secret_file = f.display().to_string();
    }
    Ok(c)
}

pub fn node(store: &str, bind: &str, secret_file: Option<&Path>, timeout_s: u64) -> Result<()> {
    let local = local_config(secret_file)?;
    ws_train::fabric::run_node_process(store, bind, &local, Duration::from_secs(timeout_s))
}

pub fn worker(store: &str, secret_file: Option<&Path>, timeout_s: u64) -> Result<()> {
    let local = local_config(secret_file)?;
    ws_train::fabric::run_worker_process(store, &local, Duration::from_secs(timeout_s))
}

fn random_secret() -> Result<String> {
    let mut b = [0u8; 32];
    ws_fabric::wire::random_fill(&mut b).map_err(|e| TrainError::Config(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Sends SIGTERM to every child still running, waits up to `grace`, then kills.
fn stop_all(children: &mut [(String, Child)], grace: Duration) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
    }
    let start = Instant::now();
    while start.elapsed() < grace && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(workers: usize, fanout: usize, config: Option<&Path>, sets: &[String]) -> Result<()> {
    let tree = Tree::new(workers, fanout).map_err(TrainError::Config)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| TrainError::Config(format!("no free port on 127.0.0.1: {e}")))?
        .port();
    let store_addr = format!("127.0.0.1:{port}");
    let mut store_sets = sets.to_vec();
    store_sets.extend([
        format!("fabric.workers={workers}"),
        format!("fabric.fanout={fanout}"),
        "fabric.transport=tcp".into(),
        "fabric.launch=join".into(),
        format!("fabric.bind={store_addr}"),
        // One machine: the store runs the top node, one loopback edge fewer.
        "fabric.top_in_store=true".into(),
    ]);
    // Bad configuration fails here, in one line, before any process starts.
    RunConfig::resolve(config, &store_sets)?.validate()?;
    let secret = match std::env::var("WEIGHTSTREAM_SECRET") {
        Ok(s) if !s.is_empty() => s,
        _ => random_secret()?,
    };
    let exe = std::env::current_exe().map_err(|e| TrainError::Config(format!("cannot find this program: {e}")))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = cores.div_ceil(workers).max(1);
    let spawn = |args: Vec<String>| -> Result<Child> {
        Command::new(&exe)
            .args(&args)
            .env("WEIGHTSTREAM_SECRET", &secret)
            .env_remove("WEIGHTSTREAM_SECRET_FILE")
            .spawn()
            .map_err(|e| TrainError::Config(format!("cannot start {}: {e}", args[0])))
    };
    let mut store_args = vec!["store".to_string()];
    if let Some(c) = config {
        store_args.extend(["--config".into(), c.display().to_string()]);
    }
    // The store runs exactly the configuration validated above.
    for s in &store_sets {
        store_args.extend(["--set".into(), s.clone()]);
    }
    store_args.extend(["--listen".into(), store_addr.clone()]);
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    std::thread::Builder::new()
        .name("ctrl-c".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
                    flag.store(true, Ordering::SeqCst);
                }
            }
        })
        .map_err(|e| TrainError::Config(format!("cannot watch for Ctrl-C: {e}")))?;
    let mut children: Vec<(String, Child)> = vec![("store".into(), spawn(store_args)?)];
    let nodes = ws_fabric::rendezvous::node_processes(&tree, 1);
    for i in 0..nodes {
        let args = vec!["fabric".into(), "--store".into(), store_addr.clone()];
        children.push((format!("fabric node {i}"), spawn(args)?));
    }
    for w in 0..workers {
        let args = vec!["worker".into(), "--store".into(), store_addr.clone(), "--threads".into(), threads.to_string()];
        children.push((format!("worker {w}"), spawn(args)?));
    }
    eprintln!(
        "cluster: a store at {store_addr} (with the top node), {nodes} fabric nodes and {workers} workers \
         (fan-out {fanout}), {threads} threads each"
    );
    let store_status = loop {
        if interrupted.load(Ordering::SeqCst) {
            stop_all(&mut children, Duration::from_secs(10));
            return Err(TrainError::Config("interrupted: every process of the cluster was stopped".into()));
        }
        match children[0].1.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(TrainError::Config(format!("waiting for the store: {e}"))),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The store ended the run (Shutdown travels down the tree), or failed;
    // give the rest a moment to finish, then stop what is left.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30)
        && children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_all(&mut children, Duration::from_secs(5));
    if !store_status.success() {
        return Err(TrainError::Config(format!("the store exited with {store_status}")));
    }
    for (name, c) in children.iter_mut().skip(1) {
        if let Ok(Some(s)) = c.try_wait() {
            if !s.success() {
                eprintln!("cluster: {name} exited with {s}");
            }
        }
    }
    Ok(())
}
