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


def make_unilm(out_root, gen):
    """Original unilm layout (`.pth`, state dict under `model`, `relative_position_index`
    buffers): a fine-tuned BEiT v2 (reference: timm's logits) and a pre-training checkpoint
    with the shared relative position bias, `mask_token` and the MIM head `lm_head`
    (reference: transformers' BeitForMaskedImageModeling after the renames of transformers'
    convert_beit_unilm_to_pytorch.py)."""
    out = os.path.join(out_root, "..", "unilm")
    os.makedirs(out, exist_ok=True)

    def index_buffers(model, sd):
        for name, buf in model.named_buffers():
            if name.endswith("relative_position_index"):
                sd[name] = buf.clone()
        return sd

    # Fine-tuned (per-block tables, layer scale, fc_norm + head).
    ft = timm.create_model("beitv2_base_patch16_224", pretrained=False, embed_dim=32, depth=2,
                           num_heads=4, mlp_ratio=2.0, img_size=48, num_classes=4)
    randomize(ft, gen)
    ft.eval()
    sd = index_buffers(ft, dict(ft.state_dict()))
    torch.save({"model": sd, "epoch": 7, "args": "unilm"}, os.path.join(out, "beitv2_ft.pth"))
    pv = torch.randn((2, 3, 48, 48), generator=gen)
    with torch.no_grad():
        logits = ft(pv)
    save_file({"pixel_values": pv, "logits": logits.contiguous()},
              os.path.join(out, "beitv2_ft.expected.safetensors"))

    # Pre-training (shared table, no pooling head, mask token, lm_head).
    pt = timm.create_model("beit_base_patch16_224", pretrained=False, embed_dim=16, depth=2,
                           num_heads=2, img_size=32, patch_size=8, num_classes=0,
                           use_abs_pos_emb=False, use_rel_pos_bias=False,
                           use_shared_rel_pos_bias=True, global_pool="token")
    randomize(pt, gen)
    pt.eval()
    sd = index_buffers(pt, dict(pt.state_dict()))
    vocab = 24
    sd["mask_token"] = torch.randn((1, 1, 16), generator=gen)
    sd["lm_head.weight"] = torch.randn((vocab, 16), generator=gen) * 0.5
    sd["lm_head.bias"] = torch.randn((vocab,), generator=gen) * 0.5
    torch.save({"model": sd}, os.path.join(out, "beit_pt.pth"))

    from transformers import BeitConfig, BeitForMaskedImageModeling
    cfg = BeitConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, image_size=32, patch_size=8, vocab_size=vocab,
                     use_mask_token=True, use_shared_relative_position_bias=True,
                     use_relative_position_bias=False, layer_scale_init_value=0.1,
                     layer_norm_eps=1e-6)
    hf = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        if k.startswith("blocks."):
            i, rest = k[7:].split(".", 1)
            L = f"beit.encoder.layer.{i}"
            A = f"{L}.attention.attention"
            if rest == "attn.qkv.weight":
                q, kk, vv = v.chunk(3, 0)
                hf[f"{A}.query.weight"], hf[f"{A}.key.weight"], hf[f"{A}.value.weight"] = q, kk, vv
                continue
            m = {"norm1": f"{L}.layernorm_before", "norm2": f"{L}.layernorm_after",
                 "attn.proj": f"{L}.attention.output.dense", "mlp.fc1": f"{L}.intermediate.dense",
                 "mlp.fc2": f"{L}.output.dense"}
            if rest == "attn.q_bias":
                hf[f"{A}.query.bias"] = v
            elif rest == "attn.v_bias":
                hf[f"{A}.value.bias"] = v
            elif rest in ("gamma_1", "gamma_2"):
                hf[f"{L}.lambda_{rest[-1]}"] = v
            else:
                mod, p = rest.rsplit(".", 1)
                hf[f"{m[mod]}.{p}"] = v
            continue
        ren = {"cls_token": "beit.embeddings.cls_token", "mask_token": "beit.embeddings.mask_token",
               "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
               "rel_pos_bias.relative_position_bias_table":
                   "beit.encoder.relative_position_bias.relative_position_bias_table",
               "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
        hf[ren.get(k, k)] = v
    # The renamed tensors are transformers' hub (4.x) names: from_pretrained maps them.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg.architectures = ["BeitForMaskedImageModeling"]
        cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(tmp, "model.safetensors"))
        mim, info = BeitForMaskedImageModeling.from_pretrained(tmp, output_loading_info=True)
        mim.eval()
    missing = [m for m in info["missing_keys"] if "relative_position_index" not in m]
    assert not missing and not info["unexpected_keys"], info
    pv = torch.randn((2, 3, 32, 32), generator=gen)
    with torch.no_grad():
        logits = mim(pixel_values=pv).logits
    save_file({"pixel_values": pv, "logits": logits.contiguous()},
              os.path.join(out, "beit_pt.expected.safetensors"))
    print("unilm fixtures", tuple(logits.shape))


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
    make_unilm(out_root, gen)
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
