"""Evaluate a saved GPT-2 checkpoint with Hugging Face transformers.

    python3 reference/check_hf_roundtrip.py CHECKPOINT_DIR TOKENS_BIN --seq T [--batch B]

Loads CHECKPOINT_DIR with GPT2LMHeadModel.from_pretrained (safetensors), reads
TOKENS_BIN as raw little-endian uint16 tokens (nanoGPT format; a leading llm.c header,
int32 magic 20240520, of 256 int32 is skipped), cuts it into non-overlapping windows
(window i: inputs tokens[i*T : i*T+T], targets tokens[i*T+1 : i*T+T+1]; a short tail is
dropped), and computes the mean next-token cross-entropy over all windows in float64.
The last line printed is exactly `loss: <value>`.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

LLMC_MAGIC = 20240520
LLMC_HEADER_INTS = 256


def read_tokens(path):
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size >= 4 and raw[:4].view("<i4")[0] == LLMC_MAGIC:
        raw = raw[LLMC_HEADER_INTS * 4:]
    return raw[: raw.size // 2 * 2].view("<u2").astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint_dir")
    ap.add_argument("tokens_bin")
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    args = ap.parse_args()
    T = args.seq

    model = GPT2LMHeadModel.from_pretrained(args.checkpoint_dir, use_safetensors=True)
    model = model.double().eval()
    tokens = torch.from_numpy(read_tokens(args.tokens_bin))
    n_win = (tokens.numel() - 1) // T
    if n_win == 0:
        raise SystemExit(f"{args.tokens_bin}: {tokens.numel()} tokens, need at least {T + 1}")
    V = model.config.vocab_size
    if int(tokens[: n_win * T + 1].max()) >= V:
        raise SystemExit(f"token id out of range for vocab_size {V}")

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_win, args.batch):
            idx = torch.arange(start, min(start + args.batch, n_win))
            offs = idx[:, None] * T + torch.arange(T)[None, :]
            x, y = tokens[offs], tokens[offs + 1]
            logits = model(x).logits
            total += F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="sum").item()
            count += y.numel()
    print(f"windows: {n_win} tokens_scored: {count}")
    print(f"loss: {total / count}")


if __name__ == "__main__":
    main()
