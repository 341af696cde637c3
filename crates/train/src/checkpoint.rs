//! Checkpoints in the Hugging Face layout: a directory with
//! `model.safetensors` (GPT-2 tensor names, Conv1D weights [in, out], the
//! tied `lm_head.weight` left out as `save_pretrained` does) and a
//! `config.json` that `GPT2Config` reads. `GPT2LMHeadModel.from_pretrained`
//! loads what we write; we load what `save_pretrained` writes (with or
//! without the `transformer.` prefix, fp32 or bf16).
//!
//! A training checkpoint adds `optimizer.safetensors` (AdamW moments) and
//! `trainer_state.json` (the step). A checkpoint is written into a temporary
//! directory, every file fsynced, then renamed into place: a crash leaves
//! either no checkpoint or a whole one.

use crate::optim::AdamW;
use crate::TrainError;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use ws_model::{Gpt2Config, Masks, ModelSpec, Params};

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

fn bytes_of(data: &[f32]) -> &[u8] {
    // Safetensors is little-endian, as is every target we build for.
    const { assert!(cfg!(target_endian = "little")) };
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

fn hf_config_json(c: &Gpt2Config) -> serde_json::Value {
    // GPT-2's end-of-text id, or the last id for a smaller test vocabulary.
    let eot = 50256.min(c.vocab_size - 1);
    serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32"
    })
}

fn write_safetensors(path: &Path, tensors: Vec<(String, &[usize], &[f32])>) -> Result<(), TrainError> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .into_iter()
        .map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), bytes_of(data))
                .expect("shape matches data length");
            (name, view)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| TrainError::Checkpoint { path: path.into(), problem: format!("cannot write: {e}") })?;
    fsync(path)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io("cannot create", path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io("cannot write", path, e))?;
    f.sync_all().map_err(|e| TrainError::io("cannot fsync", path, e))
}

fn fsync(path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| TrainError::io("cannot fsync", path, e))
}

/// Optimizer state saved with a training checkpoint.
pub struct TrainState<'a> {
    pub step: u64,
    pub optimizer: &'a AdamW,
    /// The resolved run configuration (TOML), kept beside the weights.
    pub run_toml: &'a str,
}

/// For a directory to be written at `dir` (which must not exist): its parent,
/// created if needed, and a fresh temporary directory beside it, renamed
/// into place once everything in it is written and fsynced.
fn staging_dir(dir: &Path) -> Result<(PathBuf, PathBuf), TrainError> {
    if dir.exists() {
        return Err(TrainError::Checkpoint {
            path: dir.into(),
            problem: "already exists; refusing to overwrite".into(),
        });
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| TrainError::io("cannot create directory", &parent, e))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| TrainError::io("cannot create directory", &tmp, e))?;
    Ok((parent, tmp))
}

/// Writes a checkpoint directory at `dir` atomically (temporary directory,
/// fsync, rename). `dir` must not exist yet.
///
/// `params` (and the optimizer's moments) hold the stored values: sparse
/// tensors are written dense, with zeros where `masks` has none, and the
/// masks go beside them in `masks.safetensors`.
pub fn save(
    dir: &Path,
    spec: &ModelSpec,
    params: &Params,
    masks: &Masks,
    state: Option<TrainState>,
) -> Result<(), TrainError> {
    let (parent, tmp) = staging_dir(dir)?;

    fn dense<'a>(masks: &Masks, p: &'a Params) -> std::borrow::Cow<'a, Params> {
        if masks.is_sparse() {
            std::borrow::Cow::Owned(masks.unpack(p))
        } else {
            std::borrow::Cow::Borrowed(p)
        }
    }
    let weights = dense(masks, params);
    write_safetensors(&tmp.join(MODEL_FILE), named_tensors(spec, "", &weights))?;
    if masks.is_sparse() {
        write_file(&tmp.join(ws_model::sparsity::MASKS_FILE), &masks.to_safetensors(spec))?;
    }
    let config = serde_json::to_vec_pretty(&hf_config_json(&spec.config)).expect("json");
    write_file(&tmp.join(CONFIG_FILE), &config)?;
    if let Some(state) = state {
        let (m, v) = (dense(masks, &state.optimizer.m), dense(masks, &state.optimizer.v));
        let mut all = named_tensors(spec, "exp_avg.", &m);
        all.extend(named_tensors(spec, "exp_avg_sq.", &v));
        write_safetensors(&tmp.join(OPTIMIZER_FILE), all)?;
        let st = serde_json::json!({ "format": 1, "step": state.step });
        write_file(&tmp.join(STATE_FILE), &serde_json::to_vec_pretty(&st).expect("json"))?;
        write_file(&tmp.join("run.toml"), state.run_toml.as_bytes())?;
    }
    fsync(&tmp)?;
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io("cannot rename checkpoint into place", dir, e))?;
    fsync(&parent)
}

/// A `model.safetensors` written piece by piece at known offsets: the header
/// (every tensor F32, back to back in tensor order) first, then each piece
/// where it belongs, so a model larger than memory can be exported from a
/// store checkpoint one page at a time.
struct StreamingSafetensors {
    file: std::fs::File,
    path: PathBuf,
    /// Byte offset of each tensor's data in the file.
    starts: Vec<u64>,
    lens: Vec<usize>,
    written: Vec<usize>,
}

impl StreamingSafetensors {
    fn create(path: &Path, spec: &ModelSpec) -> Result<StreamingSafetensors, TrainError> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut at = 0u64;
        let mut rel = Vec::new();
        for t in &spec.tensors {
            let bytes = 4 * t.numel() as u64;
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [at, at + bytes]}),
            );
            rel.push(at);
            at += bytes;
        }
        let mut text = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
        // The data starts 8-byte aligned, as safetensors' own writer does it.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut file = std::fs::File::create(path).map_err(|e| TrainError::io("cannot create", path, e))?;
        file.write_all(&(text.len() as u64).to_le_bytes()).map_err(|e| TrainError::io("cannot write", path, e))?;
        file.write_all(&text).map_err(|e| TrainError::io("cannot write", path, e))?;
        let base = 8 + text.len() as u64;
        file.set_len(base + at).map_err(|e| TrainError::io("cannot size", path, e))?;
        Ok(StreamingSafetensors {
            file,
            path: path.to_path_buf(),
            starts: rel.iter().map(|r| base + r).collect(),
            lens: spec.tensors.iter().map(|t| t.numel()).collect(),
            written: vec![0; spec.tensors.len()],
        })
    }

    /// Elements `offset..offset + data.len()` of tensor `t`.
    fn write(&mut self, t: usize, offset: usize, data: &[f32]) -> Result<(), TrainError> {
        use std::os::unix::fs::FileExt;
        assert!(offset + data.len() <= self.lens[t], "a piece beyond its tensor");
        let at = self.starts[t] + 4 * offset as u64;
        self.file.write_all_at(bytes_of(data), at).map_err(|e| TrainError::io("cannot write", &self.path, e))?;
        self.written[t] += data.len();
        Ok(())
    }

    fn finish(self) -> Result<(), TrainError> {
        assert_eq!(self.written, self.lens, "every element written once");
        self.file.sync_all().map_err(|e| TrainError::io("cannot fsync", &self.path, e))
    }
}

/// Exports the store checkpoint in `ckpt` (a streaming run's `checkpoint/`)
/// as a Hugging Face checkpoint directory `out`, one page in memory at a
/// time; every slab is verified, and nothing is left at `out` unless the
/// whole export succeeded. Returns the checkpoint's step.
pub fn export_store_checkpoint(spec: &ModelSpec, ckpt: &Path, out: &Path) -> Result<u64, TrainError> {
    let (parent, tmp) = staging_dir(out)?;
    let result = (|| {
        let masks = ws_store::read_checkpoint_masks(spec, ckpt).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut w = StreamingSafetensors::create(&tmp.join(MODEL_FILE), spec)?;
        let mut failed = None;
        // A sparse tensor's values, gathered until complete, then written dense.
        let mut packed: Vec<f32> = Vec::new();
        let manifest = ws_store::read_checkpoint_weights(spec, ckpt, |t, off, data| {
            let written = match masks.get(t) {
                None => w.write(t, off, data),
                Some(p) => {
                    packed.truncate(off);
                    packed.extend_from_slice(data);
                    if packed.len() < p.nnz() {
                        Ok(())
                    } else {
                        let mut dense = vec![0f32; p.k * p.n];
                        p.scatter(&packed, &mut dense);
                        w.write(t, 0, &dense)
                    }
                }
            };
            if let Err(e) = written {
                failed = Some(e);
                return Err(ws_store::StoreError::Checkpoint {
                    path: tmp.join(MODEL_FILE),
                    problem: "write failed".into(),
                });
            }
            Ok(())
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let manifest = manifest.map_err(|e| TrainError::Config(e.to_string()))?;
        w.finish()?;
        if masks.is_sparse() {
            write_file(&tmp.join(ws_model::sparsity::MASKS_FILE), &masks.to_safetensors(spec))?;
        }
        let config = serde_json::to_vec_pretty(&hf_config_json(&spec.config)).expect("json");
        write_file(&tmp.join(CONFIG_FILE), &config)?;
        fsync(&tmp)?;
        Ok(manifest.step)
    })();
    match result {
        Ok(step) => {
            std::fs::rename(&tmp, out).map_err(|e| TrainError::io("cannot rename export into place", out, e))?;
            fsync(&parent)?;
            Ok(step)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// `(prefix + name, shape, data)` for every tensor of `p`.
fn named_tensors<'a>(spec: &'a ModelSpec, prefix: &str, p: &'a Params) -> Vec<(String, &'a [usize], &'a [f32])> {
    spec.tensors
        .iter()
        .zip(&p.tensors)
        .map(|(t, data)| {
            assert_eq!(t.numel(), data.len(), "{}", t.name);
            (format!("{prefix}{}", t.name), t.shape.as_slice(), data.as_slice())
        })
        .collect()
}

fn bad(path: &Path, problem: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), problem: problem.into() }
}

/// Reads `config.json` of a Hugging Face GPT-2 directory.
pub fn load_config(dir: &Path) -> Result<Gpt2Config, TrainError> {
    let path = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(bad(
            dir,
            "not a directory (expected a checkpoint directory with model.safetensors and config.json)",
        ));
    }
    let text = std::fs::read(&path).map_err(|e| TrainError::io("cannot read checkpoint config", &path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&path, format!("invalid JSON: {e}")))?;
    let int = |key: &str| -> Result<usize, TrainError> {
        v.get(key)
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .ok_or_else(|| bad(&path, format!("missing or non-integer `{key}`")))
    };
    if let Some(mt) = v.get("model_type").and_then(|x| x.as_str()) {
        if mt != "gpt2" {
            return Err(bad(&path, format!("model_type `{mt}` is not gpt2")));
        }
    }
    if let Some(act) = v.get("activation_function").and_then(|x| x.as_str()) {
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(bad(&path, format!("activation_function `{act}` is not supported (only gelu_new)")));
        }
    }
    if let Some(eps) = v.get("layer_norm_epsilon").and_then(|x| x.as_f64()) {
        if (eps - 1e-5).abs() > 1e-12 {
            return Err(bad(&path, format!("layer_norm_epsilon {eps} is not supported (only 1e-5)")));
        }
    }
    for (key, unsupported) in
        [("tie_word_embeddings", false), ("scale_attn_weights", false), ("scale_attn_by_inverse_layer_idx", true)]
    {
        if v.get(key).and_then(|x| x.as_bool()) == Some(unsupported) {
            return Err(bad(&path, format!("`{key}: {unsupported}` is not supported")));
        }
    }
    let config = Gpt2Config {
        n_layer: int("n_layer")?,
        n_head: int("n_head")?,
        n_embd: int("n_embd")?,
        block_size: int("n_positions")?,
        vocab_size: int("vocab_size")?,
    };
    config.validate().map_err(|e| bad(&path, e.to_string()))?;
    Ok(config)
}

fn read_f32(path: &Path, name: &str, t: &safetensors::tensor::TensorView) -> Result<Vec<f32>, TrainError> {
    let d = t.data();
    match t.dtype() {
        Dtype::F32 => Ok(d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        Dtype::BF16 => {
            Ok(d.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect())
        }
        other => Err(bad(path, format!("tensor {name} has dtype {other:?}; only F32 and BF16 are read"))),
    }
}

/// Reads the tensors of `spec` from a safetensors file, mapping Hugging Face
/// names (with or without `transformer.`, under `prefix` for optimizer state).
fn read_params(path: &Path, spec: &ModelSpec, prefix: &str) -> Result<Params, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io("cannot read checkpoint", path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, format!("not a valid safetensors file: {e}")))?;
    // Every name in the file must be one of ours (with or without the
    // `transformer.` prefix), a buffer, or the tied head.
    for name in st.names() {
        let Some(stripped) = name.strip_prefix(prefix) else {
            continue;
        };
        let key =
            if stripped.starts_with("transformer.") { stripped.to_string() } else { format!("transformer.{stripped}") };
        let buffer = stripped.ends_with(".attn.bias") || stripped.ends_with(".attn.masked_bias");
        if spec.tensor_index(&key).is_none() && !buffer && stripped != "lm_head.weight" {
            return Err(bad(path, format!("unexpected tensor `{name}`")));
        }
    }
    let mut params = Params::zeros(spec);
    for (ts, data) in spec.tensors.iter().zip(params.tensors.iter_mut()) {
        let short = ts.name.strip_prefix("transformer.").expect("our names carry the prefix");
        let (name, view) = [format!("{prefix}{}", ts.name), format!("{prefix}{short}")]
            .into_iter()
            .find_map(|n| st.tensor(&n).ok().map(|v| (n, v)))
            .ok_or_else(|| bad(path, format!("tensor {prefix}{} is missing", ts.name)))?;
        if view.shape() != ts.shape.as_slice() {
            return Err(bad(
                path,
                format!("tensor {} has shape {:?} but config.json implies {:?}", ts.name, view.shape(), ts.shape),
            ));
        }
        *data = read_f32(path, &name, &view)?;
    }
    if let Ok(head) = st.tensor(&format!("{prefix}lm_head.weight")) {
        let wte = &params.tensors[spec.tensor_index("transformer.wte.weight").expect("wte")];
        if read_f32(path, "lm_head.weight", &head)? != *wte {
            return Err(bad(path, "lm_head.weight differs from transformer.wte.weight; only tied GPT-2 is supported"));
        }
    }
    for (ts, t) in spec.tensors.iter().zip(&params.tensors) {
        if let Some(j) = t.iter().position(|x| !x.is_finite()) {
            return Err(bad(path, format!("tensor {} holds a non-finite value at element {j}", ts.name)));
        }
    }
    Ok(params)
}

/// Loads a Hugging Face GPT-2 checkpoint directory: config and weights.
pub fn load(dir: &Path) -> Result<(ModelSpec, Params), TrainError> {
    let config = load_config(dir)?;
    let spec = ModelSpec::new(config);
    let params = read_params(&dir.join(MODEL_FILE), &spec, "")?;
    Ok((spec, params))
}

/// Loads the optimizer state and step of a training checkpoint.
pub fn load_train_state(dir: &Path, spec: &ModelSpec) -> Result<(u64, AdamW), TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| TrainError::io("cannot read", &state_path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(&state_path, format!("invalid JSON: {e}")))?;
    let step = v.get("step").and_then(|s| s.as_u64()).ok_or_else(|| bad(&state_path, "missing `step`"))?;
    let opt = dir.join(OPTIMIZER_FILE);
    let m = read_params(&opt, spec, "exp_avg.")?;
    let v = read_params(&opt, spec, "exp_avg_sq.")?;
    Ok((step, AdamW { m, v }))
}

/// The checkpoint directory name for a step.
pub fn dir_for_step(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(format!("checkpoint-{step:06}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        ws_store::scratch::dir(&format!("ckpt-{name}"))
    }

    fn small() -> ModelSpec {
        ModelSpec::new(Gpt2Config { n_layer: 2, n_head: 2, n_embd: 8, block_size: 16, vocab_size: 50 })
    }

    #[test]
    fn save_then_load_round_trips_weights_and_optimizer() {
        let spec = small();
        let params = Params::init(&spec, 3);
        let mut opt = AdamW::new(&spec);
        opt.m = Params::init(&spec, 4);
        opt.v = Params::init(&spec, 5);
        let dir = tmp("roundtrip").join("checkpoint-000007");
        save(
            &dir,
            &spec,
            &params,
            &Masks::dense(&spec),
            Some(TrainState { step: 7, optimizer: &opt, run_toml: "x = 1" }),
        )
        .unwrap();
        let (spec2, p2) = load(&dir).unwrap();
        assert_eq!(spec2, spec);
        assert_eq!(p2, params);
        let (step, opt2) = load_train_state(&dir, &spec).unwrap();
        assert_eq!(step, 7);
        assert_eq!((opt2.m, opt2.v), (opt.m, opt.v));
        let e = save(&dir, &spec, &params, &Masks::dense(&spec), None).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
    }

    #[test]
    fn loads_what_transformers_save_pretrained_wrote() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/hf_saved"));
        let (spec, params) = load(dir).unwrap();
        assert_eq!(spec.config, Gpt2Config { n_layer: 2, n_head: 4, n_embd: 64, block_size: 32, vocab_size: 320 });
        assert!(params.tensors.iter().all(|t| t.iter().any(|&x| x != 0.0)));
    }

    #[test]
    fn mismatched_shapes_and_missing_files_are_clear_errors() {
        let spec = small();
        let dir = tmp("mismatch").join("ck");
        save(&dir, &spec, &Params::init(&spec, 1), &Masks::dense(&spec), None).unwrap();
        let cfg = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap().replace("\"n_embd\": 8", "\"n_embd\": 16");
        std::fs::write(dir.join(CONFIG_FILE), cfg).unwrap();
        let e = load(&dir).unwrap_err().to_string();
        assert!(e.contains("has shape [50, 8] but config.json implies [50, 16]"), "{e}");
        let e = load(&tmp("nothing")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::write(dir.join(MODEL_FILE), b"garbage").unwrap();
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&hf_config_json(&spec.config)).unwrap()).unwrap();
        let e = load(&dir).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
    }
}
