//! The model against PyTorch: logits, loss and every parameter gradient of a
//! small random GPT-2 (2 layers, 4 heads, 64 channels, vocab 320), written by
//! `reference/make_fixtures.py` with `transformers.GPT2LMHeadModel` computed
//! in float64 from the same fp32 parameters.
//!
//! Tolerances (fp32 against an exact reference), for each tensor:
//! max |ours - ref| <= tol * max |ref|, i.e. relative to the tensor's scale:
//! loss and logits 1e-5, gradients 1e-4.

use safetensors::SafeTensors;
use ws_model::{Gpt2Config, ModelSpec, Params, Workspace};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures");

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("fixture lacks {name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn ids(st: &SafeTensors, name: &str) -> Vec<u32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
}

/// Fails naming the first element out of tolerance.
fn assert_scaled_close(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: {a} vs PyTorch {b} (|diff| {} > {tol} x max|ref| {scale})",
            (a - b).abs()
        );
    }
}

#[test]
fn forward_and_backward_match_pytorch_fixture() {
    let bytes = std::fs::read(format!("{FIXTURES}/gpt2_parity.safetensors")).expect("committed fixture");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/gpt2_parity.json")).unwrap()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let get = |k: &str| meta[k].as_u64().unwrap() as usize;
    let config = Gpt2Config {
        n_layer: get("n_layer"),
        n_head: get("n_head"),
        n_embd: get("n_embd"),
        block_size: get("block_size"),
        vocab_size: get("vocab_size"),
    };
    let (b, t, v) = (get("batch"), get("seq"), config.vocab_size);
    let spec = ModelSpec::new(config);
    let mut params = Params::zeros(&spec);
    for (ts, data) in spec.tensors.iter().zip(params.tensors.iter_mut()) {
        *data = f32s(&st, &ts.name);
        assert_eq!(data.len(), ts.numel(), "{}", ts.name);
    }
    let tokens = ids(&st, "input_ids");
    let targets = ids(&st, "targets");

    let mut ws = Workspace::new(&spec, b, t);
    let mut grads = Params::zeros(&spec);
    let n = spec.layer_count();
    for l in 0..n - 1 {
        ws.forward(&spec, l, &params.layer(&spec, l), &tokens, b, t);
    }
    // Logits, row by row, before the head overwrites its buffers.
    let head_w = params.layer(&spec, n - 1);
    let mut logits = vec![0f32; b * t * v];
    for r in 0..b * t {
        ws.head_logits(&spec, &head_w, r, &mut logits[r * v..(r + 1) * v]);
    }
    assert_scaled_close("logits", &logits, &f32s(&st, "logits"), 1e-5);

    let scale = 1.0 / (b * t) as f32;
    let loss_sum = ws.head(&spec, &head_w, Some(&mut grads.layer_mut(&spec, n - 1)), &targets, b, t, scale);
    let loss = (loss_sum / (b * t) as f64) as f32;
    let loss_ref = f32s(&st, "loss")[0];
    assert!((loss - loss_ref).abs() <= 1e-5 * loss_ref.abs(), "loss {loss} vs PyTorch {loss_ref}");

    for l in (0..n - 1).rev() {
        ws.backward(&spec, l, &params.layer(&spec, l), &mut grads.layer_mut(&spec, l), &tokens, b, t);
    }
    for (ts, g) in spec.tensors.iter().zip(&grads.tensors) {
        assert_scaled_close(&format!("grad.{}", ts.name), g, &f32s(&st, &format!("grad.{}", ts.name)), 1e-4);
    }
}
