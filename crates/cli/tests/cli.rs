//! The `weightstream` binary end to end: the main job's run directory,
//! `eval` against `transformers`, `generate`, and one-line errors for bad input.

use std::path::Path;
use std::process::Command;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn weightstream(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_weightstream"))
        .args(args)
        .current_dir(ROOT)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("run weightstream");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A fresh directory for one test, removed when dropped (a failing test too).
fn tmp(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("ws-cli-{name}-")).tempdir().unwrap()
}

fn fixture(name: &str) -> String {
    format!("{ROOT}/fixtures/{name}")
}

fn last_loss(stdout: &str) -> f64 {
    let line = stdout.lines().last().expect("some output");
    line.strip_prefix("loss: ").unwrap_or_else(|| panic!("last line `{line}`")).parse().unwrap()
}

/// A small model on the committed excerpt: seconds, not minutes.
fn small_run_sets(dir: &Path) -> Vec<String> {
    [
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        "model.block_size=64",
        "train.steps=4",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.eval_interval=2",
        "train.eval_batches=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("run_dir={}", dir.join("run").display()),
        format!("data.path={}", fixture("shakespeare_excerpt.txt")),
        format!("data.cache_dir={}", dir.join("cache").display()),
    ])
    .collect()
}

fn train_args(sets: &[String]) -> Vec<String> {
    let mut args = vec!["train".to_string()];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    args
}

#[test]
fn eval_of_a_transformers_checkpoint_matches_transformers() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("eval_expected.json")).unwrap()).unwrap();
    let want = expected["loss"].as_f64().unwrap();
    let out = weightstream(&[
        "eval",
        "--checkpoint",
        &fixture("hf_saved"),
        "--data",
        &fixture("eval_tokens.bin"),
        "--seq",
        "24",
        "--batch",
        "7",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let got = last_loss(&out.stdout);
    assert!((got - want).abs() <= 1e-5 * want, "eval loss {got} vs transformers {want}");
}

#[test]
fn train_writes_a_run_directory_that_eval_and_generate_read() {
    let dir_tmp = tmp("train");
    let dir = dir_tmp.path();
    let args = train_args(&small_run_sets(dir));
    let out = weightstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let run = dir.join("run");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint-000004/model.safetensors",
        "checkpoint-000004/config.json",
    ] {
        assert!(run.join(f).is_file(), "run directory lacks {f}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for key in ["train_loss", "lr", "tokens_per_s"] {
            assert!(l[key].as_f64().is_some_and(f64::is_finite), "step {}: {key}", i + 1);
        }
        assert_eq!(l.get("val_loss").is_some(), (i + 1) % 2 == 0, "validation every 2 steps");
    }
    // The resolved config reproduces the run's settings.
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("n_embd = 64") && config.contains("steps = 4"), "{config}");

    let ckpt = run.join("checkpoint-000004");
    let ckpt = ckpt.to_str().unwrap();
    let out =
        weightstream(&["eval", "--checkpoint", ckpt, "--data", &fixture("shakespeare_excerpt.txt"), "--seq", "64"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(last_loss(&out.stdout) < 11.0);

    let out = weightstream(&["generate", "--checkpoint", ckpt, "--prompt", "To be", "--tokens", "8", "--seed", "3"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("To be") && out.stdout.len() > "To be".len() + 1, "{}", out.stdout);
    let again = weightstream(&["generate", "--checkpoint", ckpt, "--prompt", "To be", "--tokens", "8", "--seed", "3"]);
    assert_eq!(again.stdout, out.stdout, "generation is seeded");
}

/// The run's first line says how many sparse matrices take the sparse
/// kernels: two layers' attention matrices at 50% stay on the dense path
/// (density above `sparsity.kernel_density_max`), their MLP matrices at 90%
/// take the sparse kernels; with the crossover raised to 0.5, all eight do.
#[test]
fn a_sparse_run_says_which_matrices_take_the_sparse_kernels() {
    let dir_tmp = tmp("sparse-header");
    let mut sets = small_run_sets(dir_tmp.path());
    sets.retain(|s| !s.starts_with("train.steps") && !s.starts_with("train.eval_interval"));
    sets.extend(["train.steps=1", "train.eval_interval=0", "train.export_hf=false"].map(String::from));
    sets.extend(["sparsity.attention=0.5", "sparsity.mlp=0.9"].map(String::from));
    for (crossover, fast) in [("0.25", 4), ("0.5", 8)] {
        let mut sets = sets.clone();
        sets.push(format!("sparsity.kernel_density_max={crossover}"));
        sets.push(format!("run_dir={}", dir_tmp.path().join(format!("run-{crossover}")).display()));
        let args = train_args(&sets);
        let out = weightstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.code, 0, "{}", out.stderr);
        let want = format!("sparse kernels for {fast} of 8 sparse matrices");
        assert!(out.stderr.contains(&want) || out.stdout.contains(&want), "no `{want}` in:\n{}", out.stderr);
    }
}

/// Runs a bad command and checks the error is one line naming `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let out = weightstream(args);
    assert_eq!(out.code, 1, "{args:?} should fail; stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{}", out.stderr);
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: `{}` lacks `{needle}`", lines[0]);
}

#[test]
fn bad_input_gets_a_one_line_error_and_exit_status_1() {
    let dir_tmp = tmp("bad");
    let dir = dir_tmp.path();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();

    assert_one_line_error(
        &["train", "--set", "train.lrr=1"],
        "unknown config key `train.lrr` (did you mean `train.lr`?)",
    );
    assert_one_line_error(&["train", "--set", "train.steps=many"], "steps");
    assert_one_line_error(&["train", "--set", "train.device=tpu"], "train.device `tpu` is not one of cpu, cuda");
    // The README's build has no CUDA worker: asking for it says how to get it.
    if !cfg!(feature = "cuda") {
        assert_one_line_error(&["train", "--set", "train.device=cuda"], "--features cuda");
        assert_one_line_error(&["bench", "cuda"], "--features cuda");
    }
    // A worker needs the cluster secret, and one that cannot reach its
    // store gives up after its limit, saying so.
    assert_one_line_error(&["worker", "--store", "127.0.0.1:1"], "the fabric needs a cluster secret");
    std::fs::write(p("secret"), "a-cluster-secret-of-32-bytes-0123\n").unwrap();
    assert_one_line_error(
        &["worker", "--store", "127.0.0.1:1", "--secret-file", &p("secret"), "--timeout", "1"],
        "cannot reach 127.0.0.1:1",
    );
    // The fabric's shape.
    assert_one_line_error(&["train", "--workers", "3"], "fabric.workers (3) must be between 1 and 4096 and divide");
    assert_one_line_error(&["train", "--workers", "2", "--fanout", "1"], "fabric.fanout = 1 is outside 2..=16");
    assert_one_line_error(&["train", "--set", "fabric.transport=udp"], "fabric.transport `udp`");
    assert_one_line_error(&["train", "--set", "sparsity.mlp=1.5"], "outside 0 to 0.99");
    assert_one_line_error(&["train", "--set", r#"sparsity.rules=["*.ln_1.*=0.5"]"#], "cannot be sparse");
    assert_one_line_error(&["train", "--set", "train.init_from=/nonexistent/dir"], "not a directory");
    assert_one_line_error(&["train", "--workers", "2", "--set", "stream.mode=resident"], "stream.mode");
    assert_one_line_error(&["train", "--config", &p("missing.toml")], "cannot read config file");
    std::fs::write(p("bad.toml"), "[train\nlr = 1").unwrap();
    assert_one_line_error(&["train", "--config", &p("bad.toml")], "bad.toml");
    assert_one_line_error(&["train", "--set", &format!("data.path={}", p("missing.txt"))], "not found");
    std::fs::write(p("short.txt"), "Hi.").unwrap();
    assert_one_line_error(
        &["train", "--set", &format!("data.path={}", p("short.txt")), "--set", "data.cache_dir="],
        "at least",
    );
    std::fs::write(p("file"), "not a directory").unwrap();
    let mut sets = small_run_sets(dir);
    sets.push(format!("run_dir={}/run", p("file")));
    let args = train_args(&sets);
    assert_one_line_error(&args.iter().map(String::as_str).collect::<Vec<_>>(), "run directory");
    std::fs::create_dir_all(p("full")).unwrap();
    std::fs::write(dir.join("full/x"), "").unwrap();
    sets.push(format!("run_dir={}", p("full")));
    let args = train_args(&sets);
    assert_one_line_error(&args.iter().map(String::as_str).collect::<Vec<_>>(), "already holds files");

    // Token files: odd length, ids beyond the checkpoint's vocabulary (320).
    let hf = fixture("hf_saved");
    std::fs::write(p("odd.bin"), [1u8, 2, 3]).unwrap();
    assert_one_line_error(&["eval", "--checkpoint", &hf, "--data", &p("odd.bin")], "odd.bin");
    let ids: Vec<u8> = [5u16, 7, 1000, 9].iter().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(p("big_ids.bin"), ids).unwrap();
    assert_one_line_error(&["eval", "--checkpoint", &hf, "--data", &p("big_ids.bin"), "--seq", "2"], "1000");
    assert_one_line_error(
        &["eval", "--checkpoint", &hf, "--data", &fixture("eval_tokens.bin"), "--seq", "999"],
        "block size",
    );

    // Checkpoints: missing, and shapes that disagree with config.json.
    assert_one_line_error(
        &["eval", "--checkpoint", &p("nothing"), "--data", &fixture("eval_tokens.bin")],
        "not a directory",
    );
    let ck = dir.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::copy(format!("{hf}/model.safetensors"), ck.join("model.safetensors")).unwrap();
    let config =
        std::fs::read_to_string(format!("{hf}/config.json")).unwrap().replace("\"n_embd\": 64", "\"n_embd\": 32");
    assert!(config.contains("\"n_embd\": 32"));
    std::fs::write(ck.join("config.json"), config).unwrap();
    assert_one_line_error(
        &["eval", "--checkpoint", ck.to_str().unwrap(), "--data", &fixture("eval_tokens.bin")],
        "but config.json implies",
    );
    assert_one_line_error(
        &["generate", "--checkpoint", &hf, "--prompt", "Shakespeare"],
        "beyond this checkpoint's vocabulary",
    );
}

#[test]
fn tiny_preset_loss_falls_on_the_bundled_corpus() {
    let corpus = Path::new(ROOT).join("../shared/data/shakespeare.txt");
    if !corpus.is_file() {
        eprintln!("skipped: {} is absent (../shared is not beside the checkout)", corpus.display());
        return;
    }
    let dir_tmp = tmp("tiny");
    let dir = dir_tmp.path();
    let run = dir.join("run");
    let out = weightstream(&[
        "train",
        "--set",
        "train.steps=30",
        "--set",
        "train.eval_interval=0",
        "--set",
        &format!("run_dir={}", run.display()),
        "--set",
        &format!("data.cache_dir={}", dir.join("cache").display()),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = lines[0]["train_loss"].as_f64().unwrap();
    let val = lines.last().unwrap()["val_loss"].as_f64().unwrap();
    // ln(50304) = 10.83 at initialisation; 30 steps of the tiny preset reach about 6.9.
    assert!(first > 10.0, "initial loss {first}");
    assert!(val < 7.5, "validation loss after 30 steps: {val} (from {first})");
}

#[test]
fn two_workers_through_the_fabric_train_checkpoint_and_resume() {
    let dir_tmp = tmp("workers");
    let dir = dir_tmp.path();
    let mut sets = small_run_sets(dir);
    sets.push("fabric.transport=tcp".into());
    let mut args = train_args(&sets);
    args.extend(["--workers", "2", "--fanout", "2"].map(String::from));
    let out = weightstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("2 workers, fan-out 2, tcp"), "{}", out.stderr);
    let run = dir.join("run");
    assert!(run.join("checkpoint").is_dir() && run.join("checkpoint-000004/model.safetensors").is_file());
    // The store's layout follows the sparse tensors' counts: a resume cannot change them.
    assert_one_line_error(
        &["train", "--resume", run.to_str().unwrap(), "--set", "sparsity.mlp=0.5"],
        "sparsity levels, rules and ramp cannot change when resuming",
    );
    let resumed =
        weightstream(&["train", "--resume", run.to_str().unwrap(), "--set", "train.steps=6", "--workers", "2"]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(resumed.stdout.contains("done: 6 steps") || resumed.stderr.contains("done: 6 steps"), "{}", resumed.stderr);
}

/// Issue 4: the same run as separate processes (`cluster`: a store, fabric
/// nodes and workers joining over authenticated TCP) and as threads of one
/// process gives the same weights, byte for byte; with sparse layers and
/// RigL too (masks down, dense gradients up, between processes).
#[test]
fn a_multi_process_cluster_equals_the_same_run_in_one_process() {
    let export = |name: &str, cmd: &str, extra: &[&str]| {
        let dir_tmp = tmp(name);
        let dir = dir_tmp.path();
        let mut sets = small_run_sets(dir);
        sets.push("train.batch_size=6".into());
        sets.extend(extra.iter().map(|s| s.to_string()));
        let mut args = train_args(&sets);
        args[0] = cmd.into();
        args.extend(["--workers", "3", "--fanout", "2"].map(String::from));
        let out = weightstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(out.code, 0, "{cmd}: {}", out.stderr);
        let ckpt = dir.join("run/checkpoint-000004");
        (std::fs::read(ckpt.join("model.safetensors")).unwrap(), std::fs::read(ckpt.join("masks.safetensors")).ok())
    };
    let threads = export("threads", "train", &[]);
    let processes = export("processes", "cluster", &[]);
    assert!(threads == processes, "the cluster's weights differ from the in-process run's");
    let sparse = ["sparsity.attention=0.75", "sparsity.mlp=0.9", "sparsity.dynamic=rigl", "sparsity.update_every=2"];
    let threads = export("sparse-threads", "train", &sparse);
    let processes = export("sparse-processes", "cluster", &sparse);
    assert!(threads.1.is_some(), "a sparse run exports its masks");
    assert!(threads == processes, "the sparse cluster's weights or masks differ from the in-process run's");
}

#[test]
fn a_worker_without_the_cluster_secret_is_refused() {
    // A store waiting for one worker; a worker with another secret.
    let dir_tmp = tmp("secret");
    let dir = dir_tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut store = std::process::Command::new(env!("CARGO_BIN_EXE_weightstream"))
        .args(["store", "--listen", &format!("127.0.0.1:{port}"), "--set", "fabric.join_timeout_s=20"])
        .args(train_args(&small_run_sets(dir)).iter().skip(1))
        .env("WEIGHTSTREAM_SECRET", "the-right-cluster-secret-0123456789")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weightstream"))
        .args(["worker", "--store", &format!("127.0.0.1:{port}"), "--timeout", "5"])
        .env("WEIGHTSTREAM_SECRET", "a-wrong-cluster-secret-0123456789")
        .output()
        .unwrap();
    let _ = store.kill();
    let _ = store.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{stderr}");
}

/// `cluster` stops every process it started on Ctrl-C (SIGINT) and says so.
#[test]
fn ctrl_c_stops_the_whole_cluster() {
    let dir_tmp = tmp("ctrl-c");
    let dir = dir_tmp.path();
    let mut sets = small_run_sets(dir);
    sets.push("train.steps=100000".into());
    let mut args = train_args(&sets);
    args[0] = "cluster".into();
    let child = Command::new(env!("CARGO_BIN_EXE_weightstream"))
        .args(&args)
        .current_dir(ROOT)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Its store (which runs the top node) and two workers.
    let children = || -> Vec<u32> {
        // /proc/PID/stat: "pid (comm) state ppid ..."; comm has no ')' here.
        let mut v = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
            let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
            let ppid: u32 = rest.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
            let state = rest.split_whitespace().next().unwrap_or("");
            if ppid == pid && state != "Z" {
                v.push(head.split_whitespace().next().unwrap().parse().unwrap());
            }
        }
        v
    };
    let start = std::time::Instant::now();
    while children().len() < 3 && start.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let started = children();
    assert_eq!(started.len(), 3, "the cluster's processes: {started:?}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted: every process of the cluster was stopped"), "{stderr}");
    assert!(children().is_empty() && started.iter().all(|p| !Path::new(&format!("/proc/{p}")).exists()));
}
