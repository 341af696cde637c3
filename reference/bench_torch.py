"""PyTorch CPU training-throughput baseline for GPT-2 (the number weightstream is compared with).

    python3 reference/bench_torch.py --preset tiny|small --precision fp32|bf16 [--steps N] [--seq T]

Builds a fresh GPT2LMHeadModel (sdpa attention, dropout 0) for the preset, uses 2 CPU
threads, and trains on random token batches (batch x seq) with AdamW (lr 6e-4,
betas (0.9, 0.95), weight decay 0.1 on dim >= 2 params), grad clip 1.0; bf16 runs the
forward under torch.autocast("cpu", dtype=torch.bfloat16). A few untimed warm-up steps,
then N timed steps. Prints ONE JSON line:
  {"impl":"pytorch","preset":..,"precision":..,"batch":..,"seq":..,"tokens_per_s":..,
   "step_ms":<median>,"peak_rss_mb":..,"torch":<version>}
"""

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block=256, batch=8, steps=10),
    "small": dict(n_layer=12, n_head=12, n_embd=768, block=1024, batch=4, steps=4),
}
VOCAB = 50304
WARMUP = 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESETS, required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    steps = args.steps or p["steps"]
    seq = args.seq or p["block"]
    batch = p["batch"]

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"],
        n_positions=max(p["block"], seq), vocab_size=VOCAB,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    model = GPT2LMHeadModel(config).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [q for q in params if q.dim() >= 2], "weight_decay": 0.1},
            {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
        ],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=False,
    )

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        x = torch.randint(0, VOCAB, (batch, seq))
        y = torch.randint(0, VOCAB, (batch, seq))
        t0 = time.perf_counter()
        with autocast():
            logits = model(x).logits
            loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(WARMUP):
        step()
    times = [step() for _ in range(steps)]
    med = statistics.median(times)
    print(json.dumps({
        "impl": "pytorch", "preset": args.preset, "precision": args.precision,
        "batch": batch, "seq": seq,
        "tokens_per_s": round(batch * seq / med, 1),
        "step_ms": round(med * 1e3, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
