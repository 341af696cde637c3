"""Write the GPT-2 parity fixtures that the Rust tests check against.

Produces (paths relative to the repository root):

  fixtures/gpt2_parity.safetensors
      <hf name>          every parameter of a small random GPT2LMHeadModel, float32,
                         under its `named_parameters()` name (Conv1D weights are [in, out];
                         the tied lm_head is not listed separately)
      input_ids, targets int64 [B, T], random ids in [0, V)
      logits             float32 [B, T, V]
      loss               float32 [1], F.cross_entropy(logits.view(-1, V), targets.view(-1))
                         (mean over B*T, targets given explicitly, no internal shift)
      grad.<hf name>     gradient of `loss` for every parameter
      adamw_losses       float32 [6], loss before each of 5 AdamW steps and after the 5th
      after.<hf name>    every parameter after the 5 AdamW steps
  fixtures/gpt2_parity.json   config, hyper-parameters, per-step grad norms, versions
  fixtures/hf_saved/          model.save_pretrained() of the same initial fp32 model

The parameters are built in float32, then upcast exactly to float64 (`model.double()`),
and every reference quantity is computed in float64 and stored rounded to float32: the
fixture is the exact answer for the stored fp32 parameters.
AdamW is torch.optim.AdamW (decoupled decay p *= 1 - lr*wd, eps added to sqrt(v_hat)),
weight decay only on parameters with dim >= 2, clip_grad_norm_ before every step,
constant lr. Deterministic: running it twice gives identical files.
"""

import json
import os
import shutil

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures")

CFG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=32, vocab_size=320)
B, T = 3, 24
LR, BETAS, EPS, WD, CLIP, STEPS = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0, 5


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(
        **CFG,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        layer_norm_epsilon=1e-5, activation_function="gelu_new",
        bos_token_id=CFG["vocab_size"] - 1, eos_token_id=CFG["vocab_size"] - 1,
    )
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    # Make every parameter non-trivial: HF init leaves biases at 0 and LayerNorm gains at 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model.eval()


def loss_of(model, input_ids, targets):
    logits = model(input_ids).logits
    V = logits.shape[-1]
    return logits, F.cross_entropy(logits.view(-1, V), targets.view(-1))


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = build_model()
    V = CFG["vocab_size"]
    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, V, (B, T), generator=gen, dtype=torch.int64)

    os.makedirs(OUT, exist_ok=True)
    hf_dir = os.path.join(OUT, "hf_saved")
    shutil.rmtree(hf_dir, ignore_errors=True)
    model.save_pretrained(hf_dir)  # transformers >= 5 always writes safetensors

    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    tensors = {name: f32(p) for name, p in model.named_parameters()}
    tensors["input_ids"] = input_ids
    tensors["targets"] = targets

    model = model.double()  # exact upcast of the fp32 parameters
    logits, loss = loss_of(model, input_ids, targets)
    loss.backward()
    tensors["logits"] = f32(logits)
    tensors["loss"] = f32(loss.reshape(1))
    for name, p in model.named_parameters():
        tensors["grad." + name] = f32(p.grad)
    model.zero_grad(set_to_none=True)

    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": WD},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=LR, betas=BETAS, eps=EPS, foreach=False, fused=False,
    )
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _, l = loss_of(model, input_ids, targets)
        l.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP).item()
        print(f"step {step}: loss {l.item():.6f} grad_norm {norm:.6f} clip {CLIP} "
              f"-> {'clipped' if norm > CLIP else 'not clipped'}")
        losses.append(l.item())
        norms.append(norm)
        opt.step()
    with torch.no_grad():
        losses.append(loss_of(model, input_ids, targets)[1].item())
    print(f"final loss {losses[-1]:.6f}")
    assert norms[0] > CLIP, "clipping must be active in the first step"
    tensors["adamw_losses"] = torch.tensor(losses, dtype=torch.float32)
    for name, p in model.named_parameters():
        tensors["after." + name] = f32(p)

    save_file(tensors, os.path.join(OUT, "gpt2_parity.safetensors"))
    meta = dict(
        **CFG, block_size=CFG["n_positions"], batch=B, seq=T,
        layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True,
        lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WD,
        weight_decay_rule="dim >= 2 gets weight_decay, others 0.0",
        grad_clip=CLIP, adamw_steps=STEPS, grad_norms_before_clip=norms,
        loss=losses[0], adamw_losses=losses,
        reference_dtype="float64 (stored as float32)",
        torch=torch.__version__, transformers=transformers.__version__,
    )
    with open(os.path.join(OUT, "gpt2_parity.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def write_eval_fixture():
    """fixtures/eval_tokens.bin (random ids, nanoGPT uint16) and the loss that
    transformers computes on it with the saved model, for `weightstream eval`."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from check_hf_roundtrip import read_tokens
    import numpy as np
    gen = np.random.default_rng(20261126)
    ids = gen.integers(0, CFG["vocab_size"], size=500, dtype=np.uint16)
    path = os.path.join(OUT, "eval_tokens.bin")
    ids.astype("<u2").tofile(path)
    model = GPT2LMHeadModel.from_pretrained(os.path.join(OUT, "hf_saved"), use_safetensors=True).double().eval()
    tokens = torch.from_numpy(read_tokens(path))
    T, V = 24, CFG["vocab_size"]
    n = (tokens.numel() - 1) // T
    offs = torch.arange(n)[:, None] * T + torch.arange(T)[None, :]
    with torch.no_grad():
        logits = model(tokens[offs]).logits
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[offs + 1].reshape(-1)).item()
    with open(os.path.join(OUT, "eval_expected.json"), "w") as f:
        json.dump({"seq": T, "windows": n, "loss": loss, "dtype": "float64"}, f, indent=2)
        f.write("\n")
    print(f"eval fixture: {n} windows of {T}, loss {loss:.6f}")


if __name__ == "__main__":
    main()
    write_eval_fixture()
