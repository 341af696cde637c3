//! Issue 4's fault test, with real processes on real sockets: a store, two
//! fabric nodes and three workers; one worker dies in the middle of step 2,
//! after the gradients of its first uses have gone up and been added at
//! the store.
//! The store drops the partial step, the survivors join again, the tree
//! forms with two workers, step 2 runs again, and the run completes. Its
//! weights equal, byte for byte, those of a run that had three workers for
//! steps 0 and 1 and two from step 2 on (a three-worker run resumed with
//! `--workers 2`): no partial update was applied. With a replacement worker
//! joining after the crash, the tree forms again with three, and the run
//! equals one that never lost a worker.

use std::path::Path;
use std::process::{Child, Command, Stdio};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const SECRET: &str = "fault-test-cluster-secret-0123456789";

/// A fresh directory for one test, removed when dropped (a failing test too).
fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("ws-fault-{name}-")).tempdir().unwrap()
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weightstream"));
    c.current_dir(ROOT).env("WEIGHTSTREAM_SECRET", SECRET).env("RAYON_NUM_THREADS", "1");
    c
}

/// A small model (4 streamed layers), 6 sequences per step, one per micro-batch.
fn sets(dir: &Path, steps: u64) -> Vec<String> {
    let excerpt = format!("{ROOT}/fixtures/shakespeare_excerpt.txt");
    [
        "model.n_layer=2".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=64".into(),
        "model.block_size=32".into(),
        format!("train.steps={steps}"),
        "train.batch_size=6".into(),
        "train.micro_batch=1".into(),
        "train.warmup_steps=1".into(),
        "train.eval_interval=0".into(),
        "train.eval_batches=1".into(),
        format!("run_dir={}", dir.join("run").display()),
        format!("data.path={excerpt}"),
        format!("data.cache_dir={}", dir.join("cache").display()),
    ]
    .into_iter()
    .collect()
}

fn with_sets(c: &mut Command, sets: &[String]) {
    for s in sets {
        c.args(["--set", s]);
    }
}

fn run_ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn final_weights(dir: &Path) -> Vec<u8> {
    weights_at(dir, 4)
}

fn weights_at(dir: &Path, step: u64) -> Vec<u8> {
    std::fs::read(dir.join(format!("run/checkpoint-{step:06}/model.safetensors"))).unwrap()
}

#[test]
fn a_worker_killed_mid_step_costs_the_step_not_the_run() {
    // The reference: three workers for two steps, then two.
    let reference_tmp = tmp("reference");
    let reference = reference_tmp.path();
    let mut c = bin();
    c.args(["train", "--workers", "3", "--fanout", "2"]);
    with_sets(&mut c, &sets(reference, 2));
    run_ok(c);
    let mut c = bin();
    c.args(["train", "--resume", reference.join("run").to_str().unwrap(), "--workers", "2"]);
    c.args(["--set", "train.steps=4"]);
    run_ok(c);

    let faulty_tmp = tmp("faulty");

    let faulty = faulty_tmp.path();
    let stderr = run_with_a_crash(faulty, Fault::Crash);
    assert!(stderr.contains("step 2 aborted"), "{stderr}");
    assert!(stderr.contains("the tree formed again with 2 workers (was 3)"), "{stderr}");
    assert!(final_weights(faulty) == final_weights(reference), "the recovered run differs from the reference");

    // A worker that stops answering instead: the step timeout catches it.
    // - Hang: at step 2's use 4, while weights still stream.
    // - HangAfterLoss: late in the step, after its loss went up; the
    //   driver's wait for the step's last gradients times out too (the
    //   simulator found this hang first).
    // - HangTopInStore: as Hang, with the top node in the store; the
    //   store's link to the tree is in-process, and closing it must free
    //   the store's sender, blocked on a tree that no longer takes weights.
    for (fault, name) in
        [(Fault::Hang, "hung"), (Fault::HangAfterLoss, "hung-late"), (Fault::HangTopInStore, "hung-top")]
    {
        let dir_tmp = tmp(name);
        let dir = dir_tmp.path();
        let stderr = run_with_a_crash(dir, fault);
        let timed_out = "step 2 aborted: no answer from the tree within fabric.step_timeout_s = 3";
        assert!(stderr.contains(timed_out), "{name}: {stderr}");
        assert!(stderr.contains("the tree formed again with 2 workers (was 3)"), "{name}: {stderr}");
        assert!(final_weights(dir) == final_weights(reference), "{name}: the run differs from the reference");
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// The worker dies.
    Crash,
    /// The worker dies and a new one is started.
    CrashAndReplace,
    /// The worker stops answering (its process stays).
    Hang,
    /// The same, in the last micro-batch's backward pass: after the
    /// worker's loss went up.
    HangAfterLoss,
    /// `Hang`, with the top node in the store's process
    /// (`fabric.top_in_store`, as `weightstream cluster` runs): the store's
    /// link to the tree is in-process.
    HangTopInStore,
}

#[test]
fn a_replacement_worker_takes_the_lost_ones_place() {
    let reference_tmp = tmp("uninterrupted");
    let reference = reference_tmp.path();
    let mut c = bin();
    c.args(["train", "--workers", "3", "--fanout", "2"]);
    with_sets(&mut c, &sets(reference, 4));
    run_ok(c);
    let replaced_tmp = tmp("replaced");
    let replaced = replaced_tmp.path();
    let stderr = run_with_a_crash(replaced, Fault::CrashAndReplace);
    assert!(stderr.contains("the tree formed again with 3 workers (was 3)"), "{stderr}");
    assert!(final_weights(replaced) == final_weights(reference), "the run with a replacement differs");
}

/// A store, two nodes and three workers, one of which fails after step 2's
/// use 4 as `fault` says. Returns the store's stderr (it must succeed).
fn run_with_a_crash(faulty: &Path, fault: Fault) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store_addr = format!("127.0.0.1:{port}");
    let mut store = bin();
    store.args(["store", "--listen", &store_addr, "--workers", "3", "--fanout", "2"]);
    with_sets(&mut store, &sets(faulty, 4));
    store.args(["--set", "fabric.step_timeout_s=3"]);
    let top_in_store = fault == Fault::HangTopInStore;
    store.args(["--set", &format!("fabric.top_in_store={top_in_store}")]);
    let store = store.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut others: Vec<Child> = Vec::new();
    for _ in 0..if top_in_store { 1 } else { 2 } {
        let mut n = bin();
        n.args(["fabric", "--store", &store_addr, "--timeout", "60"]).stderr(Stdio::null());
        others.push(n.spawn().unwrap());
    }
    let worker = || {
        let mut c = bin();
        c.args(["worker", "--store", &store_addr, "--timeout", "60"]).stderr(Stdio::null());
        c
    };
    for _ in 0..2 {
        others.push(worker().spawn().unwrap());
    }
    // Step 2, after use 4: the head's and the last block's gradients of
    // the first micro-batch have gone up (and, summed with the others',
    // into the store's accumulators).
    // Two micro-batches of seven uses each (three forward, the head, three
    // backward): use 12 is the second micro-batch's second backward use,
    // after its head use (10), where the worker's loss goes up.
    if fault == Fault::Hang || fault == Fault::HangTopInStore {
        others.push(worker().env("WEIGHTSTREAM_FAULT_STALL_AFTER", "2:4").spawn().unwrap());
    } else if fault == Fault::HangAfterLoss {
        others.push(worker().env("WEIGHTSTREAM_FAULT_STALL_AFTER", "2:12").spawn().unwrap());
    } else {
        let mut victim = worker().env("WEIGHTSTREAM_FAULT_EXIT_AFTER", "2:4").spawn().unwrap();
        assert_eq!(victim.wait().unwrap().code(), Some(137), "the victim did not die as planned");
    }
    if fault == Fault::CrashAndReplace {
        others.push(worker().spawn().unwrap());
    }
    let out = store.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for mut o in others {
        let _ = o.kill();
        let _ = o.wait();
    }
    assert!(out.status.success(), "the store failed:\n{stderr}");
    stderr
}

/// Kills one of `node_processes` fabric node processes after a few steps
/// of a run of `workers` at fan-out `fanout` (the top node in the store's
/// process when `top_in_store`); checks that the run equals, byte for byte,
/// one that never lost the node, and returns the store's stderr.
fn lose_a_node(workers: usize, fanout: usize, top_in_store: bool, node_processes: usize) -> String {
    const STEPS: u64 = 30;
    let (n, f) = (workers.to_string(), fanout.to_string());
    let reference_tmp = tmp("node-reference");
    let reference = reference_tmp.path();
    let mut c = bin();
    c.args(["train", "--workers", &n, "--fanout", &f]);
    with_sets(&mut c, &sets(reference, STEPS));
    run_ok(c);

    let dir_tmp = tmp("node-lost");
    let dir = dir_tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store_addr = format!("127.0.0.1:{port}");
    let mut store = bin();
    store.args(["store", "--listen", &store_addr, "--workers", &n, "--fanout", &f]);
    with_sets(&mut store, &sets(dir, STEPS));
    store.args(["--set", "fabric.step_timeout_s=5", "--set", &format!("fabric.top_in_store={top_in_store}")]);
    let store = store.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let spawn = |role: &str| {
        let mut c = bin();
        c.args([role, "--store", &store_addr, "--timeout", "60"]).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    let mut nodes: Vec<Child> = (0..node_processes).map(|_| spawn("fabric")).collect();
    let mut workers: Vec<Child> = (0..workers).map(|_| spawn("worker")).collect();
    // Once a few steps are done, one node dies.
    let metrics = dir.join("run/metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "the run made no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    nodes[0].kill().unwrap();
    let out = store.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for mut o in nodes.into_iter().chain(workers.drain(..)) {
        let _ = o.kill();
        let _ = o.wait();
    }
    assert!(out.status.success(), "the store failed:\n{stderr}");
    assert!(weights_at(dir, STEPS) == weights_at(reference, STEPS), "the run that lost a node differs");
    stderr
}

/// A fabric node process killed in the middle of a run (3 workers at
/// fan-out 2: a top node and one below it, each a process): the surviving
/// node process takes the top place and runs the place left over too, as
/// its parent, so the lost place's children connect to it; the tree forms
/// again with every worker, and the run equals one that never lost the
/// node, byte for byte.
#[test]
fn a_lost_fabric_nodes_parent_takes_its_children() {
    let stderr = lose_a_node(3, 2, false, 2);
    let formed = "the tree formed again with 3 workers (was 3) (node 2 runs in node 1's process)";
    assert!(stderr.contains(formed), "{stderr}");
}

/// The same where the lost place's parent is the top node that the store's
/// process runs (6 workers at fan-out 4, `fabric.top_in_store`, two node
/// processes below it): the store runs the place left over beside the top.
#[test]
fn a_lost_fabric_node_under_the_stores_top_node_runs_in_the_store() {
    let stderr = lose_a_node(6, 4, true, 2);
    let formed = "the tree formed again with 6 workers (was 6) (node 3 runs in the store)";
    assert!(stderr.contains(formed), "{stderr}");
}
