#!/usr/bin/env python3
"""Random BeitConfig parity sweep: beit-rs against transformers on configurations nobody chose.

Each trial draws a configuration (every BeitConfig option the forward reads), a head, random
weights at non-trivial scales, and random inputs (batch, size, masks, labels, head mask, hidden
states, attentions, interpolate_pos_encoding), runs transformers and `beit forward` on them and
compares every output field. The committed fixtures cover chosen cases; this looks for the ones
in between. Not part of CI (it needs torch); run it after touching the model:
    /root/venv/bin/python scripts/fuzz_parity.py --trials 200 --beit target/release/beit
    /root/venv4/bin/python scripts/fuzz_parity.py --trials 50 --v4   # head_mask (4.x honours it)
    /root/venv/bin/python scripts/fuzz_parity.py --trials 60 --wide  # heads of 16-80, 50-257 tokens
A failing trial keeps its folder (config, weights, inputs, both outputs) and prints the command
that reproduces it.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import collect, randomize  # noqa: E402

HEADS = ["BeitModel", "BeitForMaskedImageModeling", "BeitForImageClassification",
         "BeitForSemanticSegmentation"]


def draw_config(r, head, wide=False):
    heads = r.choice([1, 2, 3, 4])
    head_dim = r.choice([4, 8, 12])
    patch = r.choice([2, 4, 8])
    grid = r.choice([2, 3, 4, 5, 6]) if head != "BeitForSemanticSegmentation" else r.choice([4, 6, 8])
    layers = r.randint(1, 4)
    if wide:
        # The CPU kernels' tile edges: heads of 16-80 dimensions (the AVX-512 attention's
        # 32-wide panels), 50-257 tokens (its 14-row and 32-key tiles), widths off 32.
        head_dim = r.choice([16, 24, 32, 40, 64, 80])
        patch = r.choice([2, 4])
        grid = r.choice([7, 9, 12, 14, 16]) if head != "BeitForSemanticSegmentation" else 8
        layers = r.randint(1, 2)
    rel = r.random() < 0.6
    cfg = dict(
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=r.choice([7, 16, 37, 64] if not wide else [37, 100, 129, 256]),
        hidden_act=r.choice(["gelu", "gelu", "relu", "gelu_new", "silu", "gelu_pytorch_tanh"]),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=r.choice([3, 3, 1, 4]),
        vocab_size=r.choice([11, 50]),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        layer_norm_eps=r.choice([1e-12, 1e-6, 1e-5, 0.1]),
        use_mask_token=r.random() < 0.5,
        use_absolute_position_embeddings=r.random() < 0.5,
        use_relative_position_bias=rel and r.random() < 0.5,
        use_shared_relative_position_bias=rel and r.random() < 0.5,
        layer_scale_init_value=r.choice([0.0, 0.1]),
        use_mean_pooling=r.random() < 0.5,
        num_labels=r.choice([1, 2, 5]),
    )
    if head == "BeitForSemanticSegmentation":
        # UperNet takes four feature maps: hidden_states[i - 1] for i in out_indices (transformers).
        layers = r.randint(4, 6)
        cfg.update(
            num_hidden_layers=layers,
            out_indices=sorted(r.sample(range(1, layers + 1), 4)),
            pool_scales=r.choice([[1], [1, 2], [1, 2, 3, 6], [2, 3]]),
            use_auxiliary_head=r.random() < 0.6,
            auxiliary_channels=r.choice([8, 16]),
            auxiliary_num_convs=r.choice([1, 2]),
            auxiliary_concat_input=r.random() < 0.5,
            auxiliary_loss_weight=r.choice([0.4, 1.0]),
            semantic_loss_ignore_index=r.choice([255, 0, 1]),
            num_labels=r.choice([2, 3, 5]),
        )
    if head == "BeitForMaskedImageModeling":
        cfg["use_mask_token"] = True
    if head == "BeitForImageClassification" and r.random() < 0.4:
        cfg["problem_type"] = r.choice(["regression", "single_label_classification",
                                        "multi_label_classification"])
    return cfg


def draw_inputs(r, g, head, cfg, v4, wide=False):
    b = r.randint(1, 3)
    p = cfg["patch_size"]
    h = w = cfg["image_size"]
    interpolate = False
    # Another input size: needs interpolation of absolute embeddings; relative bias is resized.
    if r.random() < 0.3:
        h = p * r.randint(2, 7 if not wide else 17)
        w = p * r.randint(2, 7 if not wide else 17)
        interpolate = True
    x = torch.rand((b, cfg["num_channels"], h, w), generator=g) * 4 - 2
    inputs = {"pixel_values": x}
    n = (h // p) * (w // p)
    if head == "BeitForMaskedImageModeling" or (head == "BeitModel" and cfg["use_mask_token"]
                                                and r.random() < 0.5):
        m = torch.rand((b, n), generator=g) < r.choice([0.2, 0.5, 0.9])
        if head == "BeitForMaskedImageModeling":
            m[:, 0] = True
            # transformers takes the labels of the masked patches only, flattened.
            inputs["labels"] = torch.randint(0, cfg["vocab_size"], (int(m.sum()),), generator=g)
        inputs["bool_masked_pos"] = m.to(torch.uint8)
    if head == "BeitForImageClassification" and r.random() < 0.7:
        nl, pt = cfg["num_labels"], cfg.get("problem_type")
        if pt == "regression" or (pt is None and nl == 1):
            inputs["labels"] = torch.randn((b, nl), generator=g).squeeze(-1) if nl == 1 \
                else torch.randn((b, nl), generator=g)
        elif pt == "multi_label_classification":
            inputs["labels"] = (torch.rand((b, nl), generator=g) < 0.5).float()
        else:
            inputs["labels"] = torch.randint(0, nl, (b,), generator=g)
    if head == "BeitForSemanticSegmentation" and r.random() < 0.7:
        lab = torch.randint(0, cfg["num_labels"], (b, h, w), generator=g)
        ign = torch.rand((b, h, w), generator=g) < 0.2
        lab[ign] = cfg["semantic_loss_ignore_index"]
        inputs["labels"] = lab
    if v4 and r.random() < 0.6:
        hm = (torch.rand((cfg["num_hidden_layers"], cfg["num_attention_heads"]), generator=g) < 0.7)
        inputs["head_mask"] = hm.float() * (0.5 + torch.rand(hm.shape, generator=g))
    return inputs, interpolate


def run_hf(model, inputs, hidden, attn, interpolate):
    kw = {}
    for k, v in inputs.items():
        kw[k] = v.bool() if k == "bool_masked_pos" else v
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    model.eval()
    with torch.no_grad():
        out = model(**kw, output_hidden_states=hidden, output_attentions=attn,
                    interpolate_pos_encoding=interpolate)
    return collect(out, type(model).__name__, hidden, attn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beit", default="target/release/beit")
    ap.add_argument("--v4", action="store_true", help="also draw head_mask (transformers 4.x)")
    ap.add_argument("--keep", default=None, help="folder for failing trials (default: a temp dir)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--matmul-precision", default=None, choices=["bf16", "int8"],
                    help="run ours at a reduced precision (give a --tol to match: a layout "
                         "bug is an O(1) error, rounding is not)")
    ap.add_argument("--wide", action="store_true",
                    help="wider heads and longer sequences (the CPU kernels' tile edges)")
    a = ap.parse_args()
    keep = a.keep or tempfile.mkdtemp(prefix="beit-fuzz-")
    os.makedirs(keep, exist_ok=True)
    fails = 0
    for t in range(a.trials):
        seed = a.seed * 100003 + t
        r = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        head = r.choice(HEADS)
        cfg = draw_config(r, head, a.wide)
        try:
            model = getattr(transformers, head)(transformers.BeitConfig(**cfg))
        except Exception as e:  # a configuration transformers itself refuses
            print(f"trial {t}: transformers refuses {head} {cfg}: {e}")
            continue
        randomize(model, seed)
        inputs, interpolate = draw_inputs(r, g, head, cfg, a.v4, a.wide)
        hidden, attn = r.random() < 0.4, r.random() < 0.4
        try:
            want = run_hf(model, inputs, hidden, attn, interpolate)
        except Exception as e:
            print(f"trial {t}: transformers fails {head}: {e}")
            continue
        d = os.path.join(keep, f"trial{t}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        model.save_pretrained(d, safe_serialization=r.random() < 0.7)
        save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(d, "inputs.safetensors"))
        save_file(want, os.path.join(d, "expected.safetensors"))
        prec = ["--matmul-precision", a.matmul_precision] if a.matmul_precision else []
        cmd = [a.beit, *prec, "forward", "--model", d, "--inputs", os.path.join(d, "inputs.safetensors"),
               "--output", os.path.join(d, "ours.safetensors")]
        if hidden:
            cmd.append("--output-hidden-states")
        if attn:
            cmd.append("--output-attentions")
        if interpolate:
            cmd.append("--interpolate-pos-encoding")
        p = subprocess.run(cmd, capture_output=True, text=True)
        bad = []
        if p.returncode != 0:
            bad.append(f"beit forward failed: {p.stderr.strip()[-400:]}")
        else:
            got = load_file(os.path.join(d, "ours.safetensors"))
            for k, v in want.items():
                if k not in got:
                    bad.append(f"{k} missing")
                    continue
                o = got[k]
                if o.shape != v.shape:
                    bad.append(f"{k} shape {tuple(o.shape)} vs {tuple(v.shape)}")
                    continue
                err = ((o - v).abs() - a.tol * v.abs()).max().item() if v.numel() else 0.0
                if not err <= a.tol:
                    bad.append(f"{k} max err {err:.2e}")
        if bad:
            fails += 1
            print(f"trial {t} FAIL {head} {cfg} inputs "
                  f"{ {k: tuple(v.shape) for k, v in inputs.items()} } hidden={hidden} attn={attn} "
                  f"interp={interpolate}:\n   " + "\n   ".join(bad) + f"\n   repro: {' '.join(cmd)}")
        else:
            shutil.rmtree(d)
            print(f"trial {t} ok {head} ({len(want)} outputs)")
    print(f"{a.trials - fails}/{a.trials} trials agree (failures kept under {keep})")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
