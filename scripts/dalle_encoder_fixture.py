#!/usr/bin/env python3
"""Reference outputs of the DALL-E dVAE encoder (pip package `DALL-E`, module `dall_e`)
on RANDOM weights, for tests/tokenizer_dalle.rs.

Small (default): a reduced-width instance of the real `dall_e.encoder.Encoder` class
(n_hid=16, n_blk_per_group=2, vocab_size=512; the package's attrs validators, which ask
for n_hid >= 64 and vocab_size >= 512, are switched off for the construction only), written
to tests/fixtures/tokenizer/dalle_small_{weights,io}.safetensors (committed).

Full (--full DIR): the released size (n_hid=256, n_blk_per_group=2, vocab_size=8192,
53.8M parameters, ~215 MB) on a 112x112 view -> 14x14 tokens, written to DIR (default
fixtures-big/dalle_full, git-ignored). Check it with
    BEIT_DALLE_FULL_DIR=fixtures-big/dalle_full cargo test --test tokenizer_dalle -- --ignored

Weights: every conv `w` ~ N(0, 1/sqrt(fan_in)) (the module's own init) and every `b` ~
N(0, 0.02) (the module initialises biases to zero; random biases make the test stricter).
Images: per 8x8 cell a random binary colour (x0.8) plus 0.2 * U[0, 1] pixel noise. A random
encoder mostly sees the local mean colour, so high-contrast cells give more distinct tokens
than plain U[0, 1] noise would. The encoder input is map_pixels(images).

Needs: pip install DALL-E attrs safetensors
"""
import argparse
import os

import attr
import torch
from safetensors.torch import save_file

from dall_e.encoder import Encoder
from dall_e.utils import map_pixels


def build(n_hid, n_blk, vocab, seed):
    torch.manual_seed(seed)
    attr.validators.set_disabled(True)
    try:
        enc = Encoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab,
                      device=torch.device("cpu"), requires_grad=False)
    finally:
        attr.validators.set_disabled(False)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith(".b"):
                p.normal_(std=0.02)
    return enc.eval()


def make_images(b, gh, gw, seed):
    g = torch.Generator().manual_seed(seed)
    cells = (torch.rand(b, 3, gh, gw, generator=g) > 0.5).float()
    big = cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    return (0.8 * big + 0.2 * torch.rand(b, 3, gh * 8, gw * 8, generator=g)).contiguous()


def run(enc, images):
    with torch.no_grad():
        logits = enc(map_pixels(images))
    tokens = logits.argmax(1).flatten(1)
    top2 = logits.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    return logits, tokens, gap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", nargs="?", const="fixtures-big/dalle_full", default=None)
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

    if args.full is None:
        enc = build(16, 2, 512, seed=0)
        images = make_images(2, 6, 5, seed=1)  # 48x40 -> 6x5 token grid
        out_dir = os.path.join(root, "tests", "fixtures", "tokenizer")
        prefix = "dalle_small"
    else:
        enc = build(256, 2, 8192, seed=0)
        images = make_images(2, 14, 14, seed=1)  # 112x112 -> 14x14 token grid
        out_dir = args.full if os.path.isabs(args.full) else os.path.join(root, args.full)
        prefix = "dalle_full"
    os.makedirs(out_dir, exist_ok=True)
    logits, tokens, gap = run(enc, images)
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    save_file(sd, os.path.join(out_dir, f"{prefix}_weights.safetensors"))
    save_file({"images": images.contiguous(), "logits": logits.contiguous(),
               "tokens": tokens.to(torch.int64).contiguous()},
              os.path.join(out_dir, f"{prefix}_io.safetensors"))
    n_params = sum(v.numel() for v in sd.values())
    print(f"{prefix}: {n_params} params, logits {tuple(logits.shape)}, "
          f"|logits| max {logits.abs().max().item():.3f} std {logits.std().item():.3f}, "
          f"min top-2 gap {gap:.2e}, distinct tokens {tokens.unique().numel()}")


if __name__ == "__main__":
    main()
