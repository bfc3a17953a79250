#!/usr/bin/env python3
"""Gradient and optimizer parity fixtures for training (tests/train_parity.rs).

For small random configs of each architecture, in training mode with dropout and drop path off:
  model/                 the starting checkpoint (save_pretrained: hub tensor names)
  batches.safetensors    3 batches: pixel_values.K, labels.K (and bool_masked_pos.K)
  grads.safetensors      loss.0 and the gradient of every parameter on batch 0 (state_dict names)
  after.safetensors      every parameter and buffer after 3 AdamW steps (state_dict names)
  recipe.json            the optimiser recipe used (lr, warm-up, layer decay, ...)

The optimiser is unilm's BEiT fine-tuning recipe written out in plain PyTorch: AdamW
(torch.optim.AdamW) with one param group per (layer id, decay/no-decay), layer-wise lr decay
(block k: decay^(L-k), embeddings: decay^(L+1)), no weight decay on biases, norms, layer scale,
position embeddings, CLS/mask tokens and relative-position tables, linear warm-up then cosine
(unilm's cosine_scheduler, per step), gradient clipping by total norm.

Versions: torch 2.15.0, transformers 5.24.0. Run: /root/venv/bin/python scripts/make_train_fixtures.py
"""
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import randomize, tiny_config  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "train")

RECIPE = dict(lr=2e-3, min_lr=1e-5, warmup_steps=2, total_steps=10, layer_decay=0.75, weight_decay=0.05,
              betas=[0.9, 0.999], eps=1e-8, clip_grad=1.0)


def layer_id(name, num_layers):
    """unilm's get_num_layer_for_vit on transformers names (L + 2 ids)."""
    if name.startswith("beit.embeddings.") or name.startswith("embeddings."):
        return 0
    for prefix in ("beit.layers.", "layers."):
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0]) + 1
    return num_layers + 1


def no_weight_decay(name, param):
    leaf = name.split(".")[-1]
    return (param.ndim == 1 or name.endswith(".bias") or leaf in ("cls_token", "mask_token", "position_embeddings")
            or "relative_position_bias_table" in name)


def param_groups(model, num_layers):
    groups = {}
    for name, p in model.named_parameters():
        lid = layer_id(name, num_layers)
        nd = no_weight_decay(name, p)
        key = (lid, nd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if nd else RECIPE["weight_decay"],
                           "lr_scale": RECIPE["layer_decay"] ** (num_layers + 1 - lid)}
        groups[key]["params"].append(p)
    return list(groups.values())


def cosine_schedule():
    """unilm utils.cosine_scheduler, per step: linear warm-up from 0, then cosine to min_lr."""
    base, final, w, total = RECIPE["lr"], RECIPE["min_lr"], RECIPE["warmup_steps"], RECIPE["total_steps"]
    warm = np.linspace(0, base, w) if w > 0 else np.array([])
    iters = np.arange(total - w)
    cos = final + 0.5 * (base - final) * (1 + np.cos(math.pi * iters / len(iters)))
    return np.concatenate((warm, cos))


# Biases followed by a training-mode BatchNorm have an exact gradient of 0; what autograd returns
# is rounding noise, which Adam turns into +-lr steps. Both sides zero these gradients before
# the optimiser step so that the rest stays comparable (their ~0 gradient is still checked).
NOISE_ONLY = ("fpn.fpn1.conv_transpose1.bias", "fpn.fpn1.conv_transpose2.bias", "fpn.fpn2.bias")


def make_case(name, model, batches):
    d = os.path.join(OUT, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    model.save_pretrained(os.path.join(d, "model"))
    flat = {}
    for k, b in enumerate(batches):
        for key, v in b.items():
            flat[f"{key}.{k}"] = v.contiguous()
    save_file(flat, os.path.join(d, "batches.safetensors"))

    model.train()
    num_layers = model.config.num_hidden_layers

    def run(b):
        kw = dict(b)
        if "bool_masked_pos" in kw:
            kw["bool_masked_pos"] = kw["bool_masked_pos"].bool()
        return model(**kw).loss

    # Gradients of the first batch.
    model.zero_grad()
    loss = run(batches[0])
    loss.backward()
    grads = {"loss.0": loss.detach().reshape(())}
    for n, p in model.named_parameters():
        grads[n] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)  # unused -> 0
    save_file(grads, os.path.join(d, "grads.safetensors"))

    # Three optimiser steps (fresh grads each step), from the starting weights.
    model2 = type(model).from_pretrained(os.path.join(d, "model"))
    model2.train()
    model = model2
    opt = torch.optim.AdamW(param_groups(model, num_layers), lr=RECIPE["lr"], betas=tuple(RECIPE["betas"]),
                            eps=RECIPE["eps"])
    sched = cosine_schedule()
    losses = []
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = sched[step] * g["lr_scale"]
        opt.zero_grad()
        loss = run(batches[step])
        loss.backward()
        for n, p in model.named_parameters():
            if n in NOISE_ONLY and p.grad is not None:
                p.grad.zero_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_grad"])
        opt.step()
        losses.append(float(loss.detach()))
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        if n.endswith("running_mean") or n.endswith("running_var"):
            after[n] = b.detach().clone()
    save_file(after, os.path.join(d, "after.safetensors"))
    with open(os.path.join(d, "recipe.json"), "w") as f:
        json.dump(dict(RECIPE, architecture=type(model).__name__, losses=losses, zero_grad=list(NOISE_ONLY),
                       lr_schedule=[float(x) for x in sched], transformers_version=transformers.__version__,
                       torch_version=torch.__version__), f, indent=2)
    print(name, "losses", losses)


def pixels(g, b, h, w):
    return torch.rand((b, 3, h, w), generator=g) * 2 - 1


def main():
    T = transformers
    g = torch.Generator().manual_seed(777)
    no_drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)

    cfg = tiny_config(use_relative_position_bias=True, num_labels=4, **no_drop)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 21)
    make_case("cls_ce", m, [{"pixel_values": pixels(g, 3, 32, 32), "labels": torch.randint(0, 4, (3,), generator=g)}
                            for _ in range(3)])

    cfg = tiny_config(use_absolute_position_embeddings=True, use_mean_pooling=False, use_shared_relative_position_bias=True,
                      layer_scale_init_value=0.0, num_labels=3, **no_drop)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 22)
    make_case("cls_bce_abs", m, [{"pixel_values": pixels(g, 2, 32, 32),
                                  "labels": (torch.rand((2, 3), generator=g) > 0.5).float()} for _ in range(3)])

    cfg = tiny_config(use_shared_relative_position_bias=True, use_mask_token=True, **no_drop)
    m = T.BeitForMaskedImageModeling(cfg)
    randomize(m, 23)
    batches = []
    for _ in range(3):
        mask = (torch.rand((2, 64), generator=g) < 0.4).to(torch.uint8)
        mask[:, 0] = 1
        batches.append({"pixel_values": pixels(g, 2, 32, 32), "bool_masked_pos": mask,
                        "labels": torch.randint(0, cfg.vocab_size, (int(mask.sum()),), generator=g)})
    make_case("mim", m, batches)

    cfg = tiny_config(use_relative_position_bias=True, num_hidden_layers=4, out_indices=[1, 2, 3, 4], num_labels=5,
                      hidden_size=16, num_attention_heads=2, intermediate_size=24, auxiliary_channels=8,
                      pool_scales=[1, 2, 3], **no_drop)
    m = T.BeitForSemanticSegmentation(cfg)
    randomize(m, 24)
    batches = []
    for _ in range(3):
        lab = torch.randint(0, 5, (4, 32, 32), generator=g)
        lab[torch.rand((4, 32, 32), generator=g) < 0.1] = 255
        batches.append({"pixel_values": pixels(g, 4, 32, 32), "labels": lab})
    make_case("seg", m, batches)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
