#!/usr/bin/env python3
"""Fixtures for loading timm-layout BEiT / BEiT v2 checkpoints (issue 18).

Each case is a small random model built by timm itself (`timm.create_model(name,
pretrained=False, ...)` at reduced width/depth), every parameter re-drawn from a wide normal
so that default initialisations (zero biases, constant layer scales, zero tables) cannot hide
a mapping bug, saved with timm's own `save_for_hf` (timm's tensor names in `model.safetensors`
and timm's `config.json` with `architecture`, `num_classes`, `model_args`, `pretrained_cfg`),
together with `expected.safetensors`:

- `pixel_values`: a fixed random input, `logits`: timm's output for it;
- `image_pixel_values`: timm's eval transform (`resolve_data_config` + `create_transform`) of
  the committed `tests/fixtures/timm/image.png` for this model's `pretrained_cfg`.

`transforms/` holds timm's eval transform of the same image for more `pretrained_cfg`
settings (`cases.json`, `expected.safetensors`), without a model.

Usage: /root/venv/bin/python scripts/make_timm_fixtures.py [OUT_DIR]
(default tests/fixtures/timm). Needs `pip install timm` (with torch, safetensors, Pillow).
With --base it also writes a full-size beitv2_base_patch16_224 case to OUT_DIR/../timm_base
(not committed: about 350 MB).
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import timm
from timm.data import create_transform, resolve_data_config
from timm.models import save_for_hf

CASES = [
    # BEiT v1 defaults of the architecture (relative position bias per block, layer scale,
    # mean pooling with fc_norm), reduced, with a patch of 8 on a 32x32 image.
    dict(
        name="beit_base_rel",
        architecture="beit_base_patch16_224",
        kwargs=dict(embed_dim=16, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5),
        overlay=dict(crop_pct=0.875, interpolation="bicubic"),
    ),
    # BEiT v2 (ImageNet mean/std), 4 heads, mlp_ratio 2, patch 16 on 48x48.
    dict(
        name="beitv2_base",
        architecture="beitv2_base_patch16_224",
        kwargs=dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, img_size=48, num_classes=5),
        overlay=dict(
            crop_pct=0.9,
            interpolation="bicubic",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    ),
    # Absolute position embeddings + one shared relative position bias, class-token pooling
    # (final norm, no fc_norm), no layer scale, bilinear resize with crop_pct 1.
    dict(
        name="beit_abs_shared_token",
        architecture="beit_base_patch16_224",
        kwargs=dict(
            embed_dim=16,
            depth=2,
            num_heads=2,
            img_size=32,
            patch_size=8,
            num_classes=3,
            use_abs_pos_emb=True,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
            init_values=0.0,
            global_pool="token",
        ),
        overlay=dict(crop_pct=1.0, interpolation="bilinear"),
        label_names=["cat", "dog", "bird"],
    ),
]

# A timm architecture that is not BEiT: its folder must be refused with a clear error.
NOT_BEIT = dict(
    name="vit_not_beit",
    architecture="vit_tiny_patch16_224",
    kwargs=dict(embed_dim=16, depth=1, num_heads=1, img_size=16, patch_size=8, num_classes=2),
)


def randomize(model, gen):
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_image(path):
    """A deterministic non-square RGB image with structure at several scales."""
    rng = np.random.default_rng(18)
    h, w = 75, 97
    y, x = np.mgrid[0:h, 0:w]
    r = 127 + 120 * np.sin(x / 7.0)
    g = 127 + 120 * np.cos(y / 5.0)
    b = (x * 3 + y * 2) % 256
    img = np.stack([r, g, b], -1) + rng.normal(0, 20, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return Image.open(path).convert("RGB")


def make_case(case, out_root, image, gen):
    out = os.path.join(out_root, case["name"])
    img = case["kwargs"].get("img_size", 224)
    overlay = dict(input_size=(3, img, img), **case.get("overlay", {}))
    model = timm.create_model(
        case["architecture"],
        pretrained=False,
        pretrained_cfg_overlay=overlay,
        **case["kwargs"],
    )
    randomize(model, gen)
    model.eval()
    model_config = {}
    if case.get("label_names"):
        model_config["label_names"] = case["label_names"]
    save_for_hf(model, out, model_config=model_config, safe_serialization=True)

    img_size = model.patch_embed.img_size
    pixel_values = torch.randn((2, 3, *img_size), generator=gen)
    with torch.no_grad():
        logits = model(pixel_values)
    # timm's own eval transform for the saved pretrained_cfg.
    data_cfg = resolve_data_config({}, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    image_pv = transform(image).unsqueeze(0)
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "logits": logits.contiguous(),
            "image_pixel_values": image_pv.contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
    )

    # The folder loads back into timm as a local file and gives the same logits (the head is
    # kept only when the overlay's num_classes matches).
    reloaded = timm.create_model(
        case["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=os.path.join(out, "model.safetensors"), num_classes=model.num_classes
        ),
        **case["kwargs"],
    ).eval()
    with torch.no_grad():
        diff = (reloaded(pixel_values) - logits).abs().max().item()
    assert diff < 1e-5, (case["name"], diff)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    print(case["name"], cfg["architecture"], "logits", tuple(logits.shape), "data", data_cfg)


# Eval transforms alone (no model): settings whose resize/crop rounding differ from
# transformers' (torchvision's round-half-even crop offset, ResizeKeepRatio for non-square
# input sizes, squash mode) and the other filters.
TRANSFORMS = [
    dict(name="crop_round_up_bicubic", input_size=(3, 32, 32), crop_pct=0.8, interpolation="bicubic"),
    dict(name="non_square_bilinear", input_size=(3, 24, 40), crop_pct=0.95, interpolation="bilinear",
         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    dict(name="squash_lanczos", input_size=(3, 28, 28), crop_pct=0.9, interpolation="lanczos",
         crop_mode="squash"),
    dict(name="nearest_default_crop", input_size=(3, 30, 30), interpolation="nearest"),
    dict(name="box", input_size=(3, 20, 20), crop_pct=0.7, interpolation="box"),
    dict(name="hamming", input_size=(3, 21, 21), crop_pct=0.85, interpolation="hamming"),
]


def make_transforms(out_root, image):
    out = os.path.join(out_root, "transforms")
    os.makedirs(out, exist_ok=True)
    tensors = {}
    cases = []
    for case in TRANSFORMS:
        pcfg = {k: v for k, v in case.items() if k != "name"}
        data_cfg = resolve_data_config({}, pretrained_cfg=pcfg)
        tensors[case["name"]] = create_transform(**data_cfg, is_training=False)(image).contiguous()
        cases.append(dict(name=case["name"], pretrained_cfg=pcfg))
        print("transform", case["name"], tuple(tensors[case["name"]].shape), data_cfg)
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out_root = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "timm")
    os.makedirs(out_root, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(18)
    image = test_image(os.path.join(out_root, "image.png"))
    for case in CASES:
        make_case(case, out_root, image, gen)
    make_case(NOT_BEIT, out_root, image, gen)
    make_transforms(out_root, image)
    if "--base" in sys.argv:
        base = dict(
            name="beitv2_base_full",
            architecture="beitv2_base_patch16_224",
            kwargs=dict(num_classes=1000),
            overlay=dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        )
        make_case(base, os.path.join(out_root, "..", "timm_base"), image, gen)


if __name__ == "__main__":
    main()
