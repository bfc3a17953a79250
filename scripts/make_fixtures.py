#!/usr/bin/env python3
"""Build random-weight BEiT checkpoints with `transformers` and record their outputs.

Each case becomes a folder under tests/fixtures/models/<case>/ holding
  case.json            how to run it (the `beit forward` flags, tolerances, model folder)
  inputs.safetensors   pixel_values / bool_masked_pos / labels / head_mask (the forward contract)
  expected.safetensors what transformers returns, under HF field names (f32; post_processed.K i64)
and, unless case.json points at another case's model, the checkpoint itself (config.json +
model.safetensors / pytorch_model.bin / sharded safetensors), written by `save_pretrained`.

Versions used for the committed fixtures: torch 2.15.0, transformers 5.24.0 (main cases) and
transformers 4.57.6 (the `head_mask` case: 5.x ignores head_mask). Run:
    /root/venv/bin/python scripts/make_fixtures.py            # all 5.x cases
    /root/venv4/bin/python scripts/make_fixtures.py --v4      # head_mask case (transformers 4.x)
    /root/venv/bin/python scripts/make_fixtures.py --big DIR  # base-size models (not committed)

Random weights are drawn at non-trivial scales (HF's init leaves LayerNorm at 1/0, biases and
relative-position tables at 0, which would hide bugs).
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "models")


def randomize(model, seed):
    """Every parameter and buffer gets a random value at a scale where a wrong op shows."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if "relative_position_bias_table" in name:
                p.copy_(randn(p.shape) * 0.5)
            elif leaf in ("cls_token", "mask_token", "position_embeddings"):
                p.copy_(randn(p.shape) * 0.5)
            elif leaf.startswith("lambda_"):
                p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                if "conv_transpose" in name or name.startswith("fpn"):
                    fan_in = p.shape[0]  # ConvTranspose weight is (in, out, kh, kw)
                else:
                    fan_in = p[0].numel()
                p.copy_(randn(p.shape) / math.sqrt(fan_in))
            elif leaf == "weight":  # LayerNorm / BatchNorm scale
                p.copy_(1.0 + 0.2 * randn(p.shape))
            else:  # biases
                p.copy_(0.1 * randn(p.shape))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def tiny_config(**kw):
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=4,
        vocab_size=50,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    base.update(kw)
    return transformers.BeitConfig(**base)


def to_f32(t):
    return t.detach().to(torch.float32).clone().contiguous()


def collect(out, kind, want_hidden, want_attn):
    res = {}
    for field in ("last_hidden_state", "pooler_output", "logits", "loss"):
        v = getattr(out, field, None)
        if v is not None:
            res[field] = to_f32(v)
    if want_hidden and getattr(out, "hidden_states", None) is not None:
        for i, h in enumerate(out.hidden_states):
            res[f"hidden_states.{i}"] = to_f32(h)
    if want_attn and getattr(out, "attentions", None) is not None:
        for i, a in enumerate(out.attentions):
            res[f"attentions.{i}"] = to_f32(a)
    return res


def write_case(name, model, inputs, *, model_dir=None, hidden=False, attentions=False,
               interpolate=False, target_sizes=None, dtype="f32", atol=1e-4, rtol=1e-4,
               save=None, seed=0, note=""):
    """Run `model` on `inputs` and write the case folder."""
    case_dir = os.path.join(OUT, name)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    if model_dir is None:
        (save or (lambda m, d: m.save_pretrained(d)))(model, case_dir)
        model_rel = "."
    else:
        model_rel = os.path.relpath(os.path.join(OUT, model_dir), case_dir)

    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    run_model = model.to(torch_dtype)
    if hasattr(run_model, "set_attn_implementation"):
        run_model.set_attn_implementation("eager")  # attentions are only returned by the eager path
    kwargs = {}
    for k, v in inputs.items():
        if k == "pixel_values":
            kwargs[k] = v.to(torch_dtype)
        elif k == "bool_masked_pos":
            kwargs[k] = v.bool()
        elif k == "head_mask":
            kwargs[k] = v.to(torch_dtype)
        elif k == "labels" and v.is_floating_point():
            kwargs[k] = v.to(torch_dtype)
        else:
            kwargs[k] = v
    if hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    if interpolate:
        kwargs["interpolate_pos_encoding"] = True
    run_model.eval()
    with torch.no_grad():
        out = run_model(**kwargs)
    expected = collect(out, type(model).__name__, hidden, attentions)
    if target_sizes is not None or isinstance(model, transformers.BeitForSemanticSegmentation):
        proc = transformers.BeitImageProcessorPil() if hasattr(transformers, "BeitImageProcessorPil") \
            else transformers.BeitImageProcessor()
        maps = proc.post_process_semantic_segmentation(out, target_sizes=target_sizes)
        for i, m in enumerate(maps):
            expected[f"post_processed.{i}"] = m.to(torch.int64).contiguous()
    save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(case_dir, "inputs.safetensors"))
    save_file(expected, os.path.join(case_dir, "expected.safetensors"))
    case = {
        "model": model_rel,
        "architecture": type(model).__name__,
        "output_hidden_states": hidden,
        "output_attentions": attentions,
        "interpolate_pos_encoding": interpolate,
        "target_sizes": [list(t) for t in target_sizes] if target_sizes else None,
        "dtype": dtype,
        "atol": atol,
        "rtol": rtol,
        "seed": seed,
        "note": note,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(case_dir, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
    print(f"{name}: {sorted(expected.keys())[:6]}... ({len(expected)} outputs)")


def pixels(g, b, h, w, c=3):
    return torch.rand((b, c, h, w), generator=g) * 2 - 1


def random_mask(g, b, n, ratio=0.4):
    m = torch.rand((b, n), generator=g) < ratio
    m[:, 0] = True  # at least one masked patch per image
    return m.to(torch.uint8)


def make_v5_cases():
    T = transformers
    g = torch.Generator().manual_seed(1234)

    # 1. MIM, shared relative bias, mask token, layer scale: the pt22k layout.
    cfg = tiny_config(use_shared_relative_position_bias=True, use_mask_token=True, num_hidden_layers=3)
    m = T.BeitForMaskedImageModeling(cfg)
    randomize(m, 1)
    mask = random_mask(g, 2, 64)
    labels = torch.randint(0, cfg.vocab_size, (int(mask.sum()),), generator=g)
    write_case("mim_shared", m, {"pixel_values": pixels(g, 2, 32, 32), "bool_masked_pos": mask, "labels": labels},
               hidden=True, attentions=True, note="MIM: shared rel-pos bias, mask token, loss over masked patches")
    # Same model at another (non-square) resolution: the shared table is resized bilinearly.
    write_case("mim_shared_nonsquare", m, {"pixel_values": pixels(g, 2, 40, 24)}, model_dir="mim_shared",
               note="rel-pos table bilinear resize at 10x6 grid")

    # 2. Classification: per-layer relative bias, mean pooling, single-label CE.
    cfg = tiny_config(use_relative_position_bias=True, num_labels=5, num_hidden_layers=3)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 2)
    write_case("cls_perlayer_mean_ce", m,
               {"pixel_values": pixels(g, 2, 32, 32), "labels": torch.tensor([0, 4])},
               hidden=True, attentions=True, note="per-layer rel-pos, mean pooling, single-label CE")
    write_case("cls_perlayer_larger", m, {"pixel_values": pixels(g, 1, 48, 64)}, model_dir="cls_perlayer_mean_ce",
               interpolate=True, note="per-layer tables resized to a 12x16 grid; interpolate_pos_encoding=True")

    # 3. Absolute position embeddings, CLS pooling, layer scale off, multi-label BCE.
    cfg = tiny_config(use_absolute_position_embeddings=True, use_mean_pooling=False, layer_scale_init_value=0.0,
                      num_labels=4)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 3)
    write_case("cls_abs_clspool_bce", m,
               {"pixel_values": pixels(g, 2, 32, 32), "labels": (torch.rand((2, 4), generator=g) > 0.5).float()},
               hidden=True, note="abs pos emb, CLS pooling (beit.layernorm), no layer scale, multi-label BCE")
    write_case("cls_abs_bicubic_48", m, {"pixel_values": pixels(g, 2, 48, 48)}, model_dir="cls_abs_clspool_bce",
               interpolate=True, note="abs pos emb bicubic 8x8 -> 12x12")
    write_case("cls_abs_bicubic_nonsquare", m, {"pixel_values": pixels(g, 1, 32, 56)}, model_dir="cls_abs_clspool_bce",
               note="abs pos emb bicubic 8x8 -> 8x14 (interpolated whatever the flag says)")

    # 4. Regression (num_labels == 1).
    cfg = tiny_config(use_relative_position_bias=True, num_labels=1)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 4)
    write_case("cls_regression", m, {"pixel_values": pixels(g, 3, 32, 32), "labels": torch.randn(3, generator=g)},
               note="num_labels=1 -> MSE")

    # 5. Shared + per-layer bias together, explicit problem_type, greyscale input.
    cfg = tiny_config(use_relative_position_bias=True, use_shared_relative_position_bias=True, num_labels=3,
                      num_channels=1, problem_type="multi_label_classification")
    m = T.BeitForImageClassification(cfg)
    randomize(m, 5)
    write_case("cls_both_bias_grey", m,
               {"pixel_values": pixels(g, 2, 32, 32, c=1), "labels": torch.rand((2, 3), generator=g)},
               note="both biases added; problem_type from config; 1 channel")

    # 6. Bare BeitModel (no `beit.` prefix): abs + per-layer bias, mask token.
    cfg = tiny_config(use_absolute_position_embeddings=True, use_relative_position_bias=True, use_mask_token=True)
    m = T.BeitModel(cfg)
    randomize(m, 6)
    write_case("model_bare_masked", m, {"pixel_values": pixels(g, 2, 32, 32), "bool_masked_pos": random_mask(g, 2, 64)},
               hidden=True, attentions=True, note="BeitModel checkpoint has no prefix")

    # 7. Segmentation: UperNet + FCN auxiliary head (2 convs, concat input), ignore pixels.
    cfg = tiny_config(use_relative_position_bias=True, num_hidden_layers=4, out_indices=[1, 2, 3, 4], num_labels=6,
                      hidden_size=16, num_attention_heads=2, intermediate_size=24,
                      auxiliary_channels=12, auxiliary_num_convs=2, auxiliary_concat_input=True,
                      pool_scales=[1, 2, 3, 6])
    m = T.BeitForSemanticSegmentation(cfg)
    randomize(m, 7)
    seg_labels = torch.randint(0, 6, (2, 32, 32), generator=g)
    seg_labels[torch.rand((2, 32, 32), generator=g) < 0.2] = 255
    write_case("seg_aux", m, {"pixel_values": pixels(g, 2, 32, 32), "labels": seg_labels}, hidden=True,
               target_sizes=[(40, 24), (17, 33)], note="UperNet + FCN aux (2 convs, concat), ignore index 255")
    write_case("seg_aux_nonsquare", m, {"pixel_values": pixels(g, 1, 48, 32)}, model_dir="seg_aux",
               note="segmentation at 12x8 grid, post-process at native size")

    # 8. Segmentation without auxiliary head, out_indices not 1..4, aux weight ignored.
    cfg = tiny_config(use_relative_position_bias=True, num_hidden_layers=5, out_indices=[2, 3, 4, 5], num_labels=4,
                      hidden_size=16, num_attention_heads=2, intermediate_size=24,
                      use_auxiliary_head=False, pool_scales=[1, 3])
    m = T.BeitForSemanticSegmentation(cfg)
    randomize(m, 8)
    seg_labels = torch.randint(0, 4, (1, 24, 20), generator=g)
    seg_labels[0, :3] = 255
    write_case("seg_noaux", m, {"pixel_values": pixels(g, 1, 32, 32), "labels": seg_labels},
               target_sizes=[(24, 20)], note="no aux head, pool_scales [1,3], labels at another size")

    # 9. Reduced precision (weights cast on load).
    cfg = tiny_config(use_relative_position_bias=True, num_labels=5)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 9)
    pv = pixels(g, 2, 32, 32)
    write_case("dtype_f32", m, {"pixel_values": pv}, hidden=True, note="f32 reference of the dtype cases")
    write_case("dtype_bf16", m, {"pixel_values": pv}, model_dir="dtype_f32", dtype="bf16", atol=6e-2, rtol=6e-2,
               note="bf16 compute (torch CPU bf16 as reference)")
    m = T.BeitForImageClassification.from_pretrained(os.path.join(OUT, "dtype_f32"))
    write_case("dtype_f16", m, {"pixel_values": pv}, model_dir="dtype_f32", dtype="f16", atol=1e-2, rtol=1e-2,
               note="f16 compute (torch CPU f16 as reference)")

    # 10. Checkpoint formats: pytorch_model.bin with v5 in-memory names, .bin with legacy names, sharded.
    cfg = tiny_config(use_relative_position_bias=True, use_mask_token=True, num_labels=3)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 10)

    def save_bin_v5_names(model, d):
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(d)
        torch.save(model.state_dict(), os.path.join(d, "pytorch_model.bin"))

    def save_bin_legacy_names(model, d):
        model.save_pretrained(d)
        from safetensors.torch import load_file
        sd = load_file(os.path.join(d, "model.safetensors"))
        os.remove(os.path.join(d, "model.safetensors"))
        # 2021-era hub checkpoints also carry the relative_position_index buffers: they must be ignored.
        sd["beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_index"] = \
            torch.zeros((65, 65), dtype=torch.int64)
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))

    def save_sharded(model, d):
        model.save_pretrained(d, max_shard_size="20KB")

    pv = pixels(g, 2, 32, 32)
    write_case("format_bin_v5_names", m, {"pixel_values": pv}, save=save_bin_v5_names,
               note="torch.save(state_dict): in-memory 5.x names (beit.layers.N.attention.q_proj ...)")
    write_case("format_bin_legacy", m, {"pixel_values": pv}, save=save_bin_legacy_names,
               note="pytorch_model.bin with hub names + relative_position_index buffer")
    write_case("format_sharded", m, {"pixel_values": pv}, save=save_sharded, note="sharded safetensors + index")

    # 11. Legacy config keys as hub files have them (segmentation_indices, torch_dtype, ...).
    cfg = tiny_config(use_relative_position_bias=True, num_hidden_layers=4, out_indices=[1, 2, 3, 4], num_labels=3,
                      auxiliary_channels=8, hidden_size=16, num_attention_heads=2, intermediate_size=24)
    m = T.BeitForSemanticSegmentation(cfg)
    randomize(m, 11)

    def save_legacy_config(model, d):
        model.save_pretrained(d)
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        c["segmentation_indices"] = c.pop("out_indices")
        for k in ("out_features", "stage_names", "dtype"):
            c.pop(k, None)
        c["torch_dtype"] = "float32"
        c["transformers_version"] = "4.16.0.dev0"
        c["some_future_key"] = {"nested": [1, 2]}
        json.dump(c, open(p, "w"), indent=2)

    write_case("legacy_config_seg", m, {"pixel_values": pixels(g, 1, 32, 32)}, save=save_legacy_config,
               note="config.json with segmentation_indices/torch_dtype and an unknown key")

    # 12. data2vec-vision: the same architecture under another model_type and prefix.
    d2v_cfg = T.Data2VecVisionConfig(**{k: v for k, v in tiny_config(use_relative_position_bias=True,
                                                                      num_labels=3).to_dict().items()
                                        if k not in ("model_type", "architectures", "transformers_version")})
    m = T.Data2VecVisionForImageClassification(d2v_cfg)
    randomize(m, 12)
    write_case("data2vec_cls", m, {"pixel_values": pixels(g, 2, 32, 32)}, note="model_type data2vec-vision")


def make_v4_cases():
    T = transformers
    assert T.__version__.startswith("4."), "run the head_mask case with transformers 4.x"
    g = torch.Generator().manual_seed(4321)
    cfg = tiny_config(use_relative_position_bias=True, num_labels=3, num_hidden_layers=3)
    cfg._attn_implementation = "eager"
    m = T.BeitForImageClassification(cfg)
    randomize(m, 13)
    head_mask = (torch.rand((3, 4), generator=g) * 1.5)
    head_mask[0, 1] = 0.0
    head_mask[2, 3] = 0.0
    write_case("head_mask_v4", m, {"pixel_values": pixels(g, 2, 32, 32), "head_mask": head_mask},
               hidden=True, attentions=True, note="transformers 4.x head_mask semantics (probs *= mask[l, h])")


def make_big(out_dir):
    """Base-size architectures (random weights) for the 1e-3 parity check. Not committed."""
    global OUT
    OUT = out_dir
    T = transformers
    g = torch.Generator().manual_seed(99)
    cfg = T.BeitConfig(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1,
                       num_labels=1000, drop_path_rate=0.0)
    m = T.BeitForImageClassification(cfg)
    randomize(m, 100)
    write_case("base_cls_224", m, {"pixel_values": pixels(g, 2, 224, 224)}, atol=1e-3, rtol=1e-3,
               note="beit-base-patch16-224 architecture")
    cfg = T.BeitConfig(use_relative_position_bias=True, image_size=640, num_labels=150, out_indices=[3, 5, 7, 11],
                       use_auxiliary_head=True, drop_path_rate=0.0)
    m = T.BeitForSemanticSegmentation(cfg)
    randomize(m, 101)
    write_case("base_seg_ade_640", m, {"pixel_values": pixels(g, 1, 640, 640)}, atol=1e-3, rtol=1e-3,
               note="beit-base-finetuned-ade-640-640 architecture")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--v4", action="store_true", help="write the transformers-4.x cases (head_mask)")
    ap.add_argument("--big", metavar="DIR", help="write base-size cases into DIR instead")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.big:
        make_big(a.big)
    elif a.v4:
        make_v4_cases()
    else:
        make_v5_cases()
