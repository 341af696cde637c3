//! `train`, `eval` and `generate`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ws_data::{eval_windows, load_tokens, window, Tokenizer};
use ws_kernels::Rng;
use ws_model::Workspace;
use ws_train::trainer::{Progress, StepStats};
use ws_train::Engine;
use ws_train::{checkpoint, RunConfig, TrainError};

pub type Result<T> = std::result::Result<T, TrainError>;

/// Uses `threads` worker threads (0: one per core) for every kernel.
pub fn set_threads(threads: usize) {
    // Only the first call in a process can size the global pool.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
}

struct Bar {
    bar: ProgressBar,
    tty: bool,
    started: Instant,
    tokens: usize,
    last_print: Instant,
}

impl Progress for Bar {
    fn started(&mut self, engine: &dyn Engine, run_dir: &Path) {
        let c = engine.config();
        let msg = format!(
            "run {} | preset {} | {:.1}M parameters{} | batch {} x {} tokens | {} steps | {}{} | {} threads",
            run_dir.display(),
            c.preset,
            engine.spec().parameter_count() as f64 / 1e6,
            if engine.spec().is_sparse() || c.sparsity.ramp_steps > 0 {
                let target = c.model_spec_at(u64::MAX).ok();
                // At the target: how many sparse matrices are sparse enough
                // for the sparse kernels (the rest run dense on their masks).
                let (fast, sparse) = target.as_ref().map_or((0, 0), |s| {
                    let sparse = s.tensors.iter().filter(|t| t.is_sparse());
                    sparse.fold((0, 0), |(f, n), t| {
                        let density = t.len() as f64 / t.numel().max(1) as f64;
                        let runs = ws_model::workspace::runs_sparse_kernels(density, c.sparsity.kernel_density_max);
                        (f + usize::from(runs), n + 1)
                    })
                });
                format!(
                    " ({:.1}M nonzero now, {:.1}M at the target sparsity, sparse kernels for {fast} of {sparse} \
                     sparse matrices{})",
                    engine.spec().stored_count() as f64 / 1e6,
                    target.map_or(0, |s| s.stored_count()) as f64 / 1e6,
                    if c.sparsity.dynamic == "off" {
                        String::new()
                    } else {
                        format!(", dynamic {}", c.sparsity.dynamic)
                    }
                )
            } else {
                String::new()
            },
            c.train.batch_size,
            c.seq_len(),
            c.train.steps,
            c.stream.mode,
            if c.uses_fabric() {
                format!(" | {} workers, fan-out {}, {}", c.fabric.workers, c.fabric.fanout, c.fabric.transport)
            } else {
                String::new()
            },
            rayon::current_num_threads()
        );
        self.bar.println(msg.clone());
        if !self.tty {
            eprintln!("{msg}");
        }
        self.started = Instant::now();
    }

    fn step(&mut self, s: &StepStats, val: Option<f64>) {
        self.tokens += s.tokens;
        let tps = self.tokens as f64 / self.started.elapsed().as_secs_f64();
        let val = val.map(|v| format!(" val {v:.4}")).unwrap_or_default();
        self.bar.set_message(format!("loss {:.4}{val} | {tps:.0} tok/s | lr {:.2e}", s.loss, s.lr));
        self.bar.set_position(s.step);
        if !self.tty && (self.last_print.elapsed().as_secs_f64() > 10.0 || !val.is_empty()) {
            eprintln!("step {} loss {:.4}{val} {tps:.0} tok/s", s.step, s.loss);
            self.last_print = Instant::now();
        }
    }

    fn message(&mut self, text: &str) {
        self.bar.println(text);
        if !self.tty {
            eprintln!("{text}");
        }
    }
}

pub fn train(config_file: Option<&Path>, sets: &[String], resume: Option<&Path>) -> Result<()> {
    let config = match resume {
        None => RunConfig::resolve(config_file, sets)?,
        Some(run_dir) => {
            if config_file.is_some() {
                return Err(TrainError::Config("--resume takes the run's own configuration; drop --config".into()));
            }
            ws_train::trainer::resume_config(run_dir, sets)?
        }
    };
    set_threads(config.train.threads);
    let cache = (!config.data.cache_dir.is_empty()).then(|| PathBuf::from(&config.data.cache_dir));
    let tokens = load_tokens(Path::new(&config.data.path), cache.as_deref())?;
    let split = ws_data::split(tokens, config.data.val_fraction, config.seq_len())?;
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(config.train.steps),
        if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} {msg} | ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut progress = Bar { bar, tty, started: Instant::now(), tokens: 0, last_print: Instant::now() };
    let run_dir = match resume {
        None => ws_train::trainer::run(config, &split, &mut progress)?,
        Some(_) => ws_train::trainer::resume(config, &split, &mut progress)?,
    };
    progress.bar.finish();
    let records = ws_train::metrics::read(&run_dir.join("metrics.jsonl"))?;
    let first = records.first().map(|r| r.train_loss).unwrap_or(f64::NAN);
    let last = records.last().map(|r| r.train_loss).unwrap_or(f64::NAN);
    let val = records.iter().rev().find_map(|r| r.val_loss).unwrap_or(f64::NAN);
    println!(
        "done: {} steps, train loss {first:.4} -> {last:.4}, validation loss {val:.4}; run directory {}",
        records.len(),
        run_dir.display()
    );
    Ok(())
}

pub fn eval(checkpoint_dir: &Path, data: &Path, batch: usize, seq: Option<usize>) -> Result<()> {
    let (spec, params) = checkpoint::load(checkpoint_dir)?;
    let t = seq.unwrap_or(spec.config.block_size);
    if t == 0 || t > spec.config.block_size {
        return Err(TrainError::Config(format!(
            "--seq {t} must be between 1 and the model's block size {}",
            spec.config.block_size
        )));
    }
    if batch == 0 {
        return Err(TrainError::Config("--batch must be at least 1".into()));
    }
    let tokens = load_tokens(data, None)?;
    ws_data::check_vocab(&tokens, spec.config.vocab_size)?;
    let n = eval_windows(tokens.len(), t);
    if n == 0 {
        return Err(TrainError::Config(format!(
            "{} holds {} tokens; one window of --seq {t} needs {}",
            data.display(),
            tokens.len(),
            t + 1
        )));
    }
    let mut ws = Workspace::new(&spec, batch.min(n), t);
    let layers = spec.layer_count();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut sum = 0f64;
    let mut i = 0;
    while i < n {
        let b = batch.min(n - i);
        inputs.clear();
        targets.clear();
        for w in i..i + b {
            window(&tokens, t, w, &mut inputs, &mut targets);
        }
        for l in 0..layers - 1 {
            ws.forward(&spec, l, &params.layer(&spec, l), &inputs, b, t);
        }
        sum += ws.head(&spec, &params.layer(&spec, layers - 1), None, &targets, b, t, 0.0);
        i += b;
    }
    eprintln!("{n} windows of {t} tokens from {}", data.display());
    println!("loss: {:.6}", sum / (n * t) as f64);
    Ok(())
}

pub fn generate(
    checkpoint_dir: &Path,
    prompt: &str,
    count: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
) -> Result<()> {
    let (spec, params) = checkpoint::load(checkpoint_dir)?;
    let tok = Tokenizer::gpt2()?;
    let v = spec.config.vocab_size;
    let mut ids = tok.encode(prompt);
    if ids.is_empty() {
        ids.push(Tokenizer::EOT.min(v as u32 - 1));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
        return Err(TrainError::Config(format!(
            "the prompt has token id {bad}, beyond this checkpoint's vocabulary of {v}"
        )));
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(TrainError::Config("--temperature must be a finite number >= 0".into()));
    }
    let t_max = spec.config.block_size;
    let mut ws = Workspace::new(&spec, 1, t_max);
    let layers = spec.layer_count();
    let mut rng = Rng::new(seed);
    let mut logits = vec![0f32; v];
    let prompt_len = ids.len();
    // Ids the tokenizer cannot decode (the vocabulary is padded to 50304).
    let decodable = v.min(Tokenizer::VOCAB_SIZE);
    for _ in 0..count {
        let ctx = &ids[ids.len().saturating_sub(t_max)..];
        let t = ctx.len();
        for l in 0..layers - 1 {
            ws.forward(&spec, l, &params.layer(&spec, l), ctx, 1, t);
        }
        ws.head_logits(&spec, &params.layer(&spec, layers - 1), t - 1, &mut logits);
        ids.push(sample(&logits[..decodable], temperature, top_k, &mut rng));
    }
    println!("{}{}", prompt, tok.decode(&ids[prompt_len..]));
    Ok(())
}

/// Picks a token: argmax at temperature 0, else softmax(logits / T) over
/// the `top_k` largest (all when 0).
fn sample(logits: &[f32], temperature: f64, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = logits.iter().enumerate().fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
    if temperature == 0.0 {
        return argmax as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < logits.len() {
        order.select_nth_unstable_by(top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        order.truncate(top_k);
    }
    let max = logits[argmax] as f64;
    let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform_f64() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax as u32
}

pub fn export(run: &Path, out: &Path) -> Result<()> {
    let ckpt = if run.join("checkpoint").join(ws_store::MANIFEST).is_file() {
        run.join("checkpoint")
    } else {
        run.to_path_buf()
    };
    let manifest = ws_store::read_manifest(&ckpt).map_err(|e| TrainError::Config(e.to_string()))?;
    let config = RunConfig::resolve_text(&manifest.run_toml, &[])?;
    let spec = config.model_spec_at(manifest.step)?;
    // Page by page from the checkpoint's slabs: a model larger than memory exports too.
    checkpoint::export_store_checkpoint(&spec, &ckpt, out)?;
    println!("exported step {} to {}", manifest.step, out.display());
    Ok(())
}
