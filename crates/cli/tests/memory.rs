//! The memory budgets hold, measured: a streaming run whose model state is
//! several times the store's DRAM budget runs in a child process, and the
//! child's peak resident set (getrusage of the waited-for child; this test
//! binary starts no other child) stays under the store's budget plus the
//! worker's plus a fixed allowance of 128 MiB. The allowance covers what the
//! worker's accounting does not model yet: the binary, the tokenizer's
//! tables, the data, and the GEMM library's per-call scratch, which stays in
//! the allocator's per-thread arenas. Measured on the 2-core developer
//! machine: 241 MiB in most runs and 284 MiB in one, that is 33 to 76 MiB
//! above the 208 MiB of budgets; an allowance of 64 MiB failed once in CI.
//! The store's own memory is bounded exactly (its DRAM peak is checked in
//! the store's and the streaming tests).

use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const MIB: u64 = 1 << 20;

#[test]
fn a_streaming_run_stays_within_the_store_and_worker_budgets() {
    let dir_tmp = tempfile::Builder::new().prefix("ws-memory-").tempdir().unwrap();
    let dir = dir_tmp.path();
    let (store, worker, allowance) = (48 * MIB, 160 * MIB, 128 * MIB);
    // 8 layers of 256 channels and the GPT-2 vocabulary: 19.3 M parameters,
    // 309 MB of model state, more than six times the store's budget.
    let sets = [
        "model.n_layer=8".to_string(),
        "model.n_head=4".into(),
        "model.n_embd=256".into(),
        "model.block_size=64".into(),
        "train.batch_size=8".into(),
        "train.steps=3".into(),
        "train.eval_batches=1".into(),
        "train.export_hf=false".into(),
        "stream.prefetch_depth=0".into(),
        format!("store.dram_bytes={store}"),
        "store.page_bytes=8388608".into(),
        format!("worker.memory_bytes={worker}"),
        format!("data.path={ROOT}/fixtures/shakespeare_excerpt.txt"),
        format!("data.cache_dir={}", dir.join("cache").display()),
        format!("run_dir={}", dir.join("run").display()),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weightstream"));
    cmd.current_dir(ROOT).arg("train");
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let peak = usage.ru_maxrss as u64 * 1024;
    let limit = store + worker + allowance;
    eprintln!("peak RSS {} MiB; budgets {} + {} MiB", peak / MIB, store / MIB, worker / MIB);
    assert!(peak <= limit, "peak RSS {} MiB over the budgets plus allowance, {} MiB", peak / MIB, limit / MIB);
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
}
