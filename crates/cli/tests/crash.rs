//! Crash safety of store checkpoints, with real processes: a run that
//! checkpoints every step is killed with SIGKILL at seeded random moments,
//! many times (most kills land inside a checkpoint write: it is most of a
//! step's time here). After every kill the last complete checkpoint must
//! load with every slab verified (`weightstream export` restores it), and the
//! run must resume from it. A failing round prints its seed and delay.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weightstream"));
    c.current_dir(ROOT).env("RAYON_NUM_THREADS", "1");
    c
}

#[test]
fn sigkill_at_random_points_always_leaves_a_verifiable_checkpoint() {
    let dir_tmp = tempfile::Builder::new().prefix("ws-crash-").tempdir().unwrap();
    let dir = dir_tmp.path();
    let run = dir.join("run");
    let sets = [
        "model.n_layer=4".to_string(),
        "model.n_head=2".into(),
        "model.n_embd=32".into(),
        "model.block_size=32".into(),
        "model.vocab_size=50304".into(),
        "train.batch_size=2".into(),
        "train.steps=100000".into(),
        "train.eval_interval=0".into(),
        "train.checkpoint_interval=1".into(),
        format!("data.path={ROOT}/fixtures/shakespeare_excerpt.txt"),
        format!("data.cache_dir={}", dir.join("cache").display()),
        format!("run_dir={}", run.display()),
    ];
    let seed = 2026u64;
    let mut rng = ws_kernels::Rng::new(seed);
    let (mut verified, mut resumed) = (0, 0);
    for round in 0..12 {
        let manifest = run.join("checkpoint").join("manifest.json");
        let mut cmd = bin();
        if manifest.is_file() {
            cmd.args(["train", "--resume", run.to_str().unwrap()]);
            resumed += 1;
        } else {
            let _ = std::fs::remove_dir_all(&run);
            cmd.arg("train");
            for s in &sets {
                cmd.args(["--set", s]);
            }
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let delay = 700 + rng.below(1500);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if manifest.is_file() {
            let out = bin()
                .args(["export", "--run", run.to_str().unwrap(), "--out"])
                .arg(dir.join(format!("export-{round}")))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "seed {seed} round {round} (killed after {delay} ms): the checkpoint does not verify: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(Path::new(&dir.join(format!("export-{round}/model.safetensors"))).is_file());
            verified += 1;
        }
    }
    assert!(verified >= 8, "only {verified} of 12 kills left a checkpoint: the runs are too slow to reach one");
    assert!(resumed >= 6, "only {resumed} resumes");
}
