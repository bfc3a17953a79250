#!/usr/bin/env python
"""Generate the image-processor test fixtures under tests/fixtures/processor/.

Run from the repository root:

    /root/venv/bin/python scripts/make_processor_fixtures.py

Reference versions (the script refuses to run with others unless --any-version is given):
    transformers 5.24.0  (BeitImageProcessorPil, the PIL backend = reference)
    Pillow       13.0.0  (resampling, decoding through libjpeg-turbo)
    numpy        2.4.x, safetensors 0.8.x
    scikit-image 0.26.0  (only as the source of the real photos in skimage/data)

Every expected value is produced by Pillow or transformers; nothing is hand-written. Outputs:

    images/                source images (skimage photos copied byte-for-byte, small crops of
                           them re-encoded by Pillow in many formats/modes, EXIF-rotated JPEGs)
    bad/                   broken inputs (truncated, empty, text, zero-sized, decompression bomb)
    maps/                  segmentation maps (L and P mode PNGs, labels 0..N and 255)
    configs/               preprocessor_config.json variants (legacy and 5.x)
    decode.json            expected decode results (shape + FNV-1a 64 of the RGB bytes, arrays
                           for small images in decode.safetensors)
    processor.json         preprocessing cases; expected arrays in processor.safetensors
    sweep.json             random resize cases (Pillow) on random images; arrays in
                           sweep.safetensors
"""

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
import PIL
import skimage
import transformers
from PIL import Image, ImageOps, features
from safetensors.numpy import save_file
from transformers import BeitImageProcessorPil
from transformers.image_transforms import convert_to_rgb

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "processor")
SKDATA = os.path.join(os.path.dirname(skimage.__file__), "data")

FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def fnv1a64(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for byte in b:
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def fnv1a64_np(a: np.ndarray) -> str:
    # Vectorised over chunks is awkward for FNV; the images are small enough for a plain loop
    # over bytes objects in pure Python (a few hundred KB at most).
    return fnv1a64(np.ascontiguousarray(a).tobytes())


# ----------------------------------------------------------------------------------------------
# Minimal PNG writer (arbitrary colour type / bit depth / tRNS), independent of Pillow's encoder.


def _chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def png_bytes(arr, color_type, bit_depth, palette=None, trns=None, width=None, height=None):
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    if arr.ndim == 2:
        arr = arr[..., None]
    rows = []
    for y in range(h):
        r = arr[y].reshape(-1).astype(np.int64)
        if bit_depth == 16:
            b = r.astype(">u2").tobytes()
        elif bit_depth == 8:
            b = r.astype(np.uint8).tobytes()
        else:
            per = 8 // bit_depth
            out = bytearray()
            for i in range(0, len(r), per):
                v = 0
                for j in range(per):
                    s = int(r[i + j]) if i + j < len(r) else 0
                    v = (v << bit_depth) | s
                out.append(v)
            b = bytes(out)
        rows.append(b"\x00" + b)
    ihdr = struct.pack(">IIBBBBB", width if width is not None else w,
                       height if height is not None else h, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if palette is not None:
        data += _chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    if trns is not None:
        data += _chunk(b"tRNS", trns)
    data += _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    return data


def write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------------------------


def make_images(rng):
    """Writes images/ and returns the list of decode cases."""
    d = os.path.join(OUT, "images")
    os.makedirs(d, exist_ok=True)
    for name in ["chelsea.png", "rocket.jpg", "horse.png", "microaneurysms.png",
                 "no_time_for_that_tiny.gif", "multipage.tif"]:
        shutil.copyfile(os.path.join(SKDATA, name), os.path.join(d, name))

    chelsea = np.array(Image.open(os.path.join(SKDATA, "chelsea.png")).convert("RGB"))
    crop = chelsea[100:148, 180:244]  # 64x48 (WxH) crop around the cat's face
    small = chelsea[120:141, 200:233]  # 33x21
    camera = np.array(Image.open(os.path.join(SKDATA, "camera.png")))
    gsmall = camera[200:237, 220:259]  # 39x37 grey

    files = {}

    def save(name, im, **kw):
        buf = io.BytesIO()
        im.save(buf, **kw)
        write(os.path.join(d, name), buf.getvalue())
        files[name] = kw.get("format")

    # --- PNG variants written by our own encoder (exotic bit depths / tRNS).
    s16 = small.astype(np.uint16) * 257 + rng.integers(0, 257, small.shape)
    a16 = rng.integers(0, 65536, small.shape[:2])
    write(os.path.join(d, "rgb16.png"), png_bytes(s16, 2, 16))
    write(os.path.join(d, "rgba16.png"), png_bytes(np.dstack([s16, a16]), 6, 16))
    write(os.path.join(d, "la16.png"), png_bytes(np.dstack([s16[..., 0], a16]), 4, 16))
    write(os.path.join(d, "g16.png"),
          png_bytes(rng.integers(0, 2, small.shape[:2]) * rng.integers(0, 600, small.shape[:2]), 0, 16))
    g16t = rng.integers(0, 4, small.shape[:2]) * 100
    write(os.path.join(d, "g16_trns.png"), png_bytes(g16t, 0, 16, trns=struct.pack(">H", 200)))
    write(os.path.join(d, "la8.png"),
          png_bytes(np.dstack([gsmall[:21, :33], rng.integers(0, 256, (21, 33))]), 4, 8))
    g8t = gsmall // 64 * 64
    write(os.path.join(d, "g8_trns.png"), png_bytes(g8t, 0, 8, trns=struct.pack(">H", 128)))
    for bits in (1, 2, 4):
        write(os.path.join(d, f"g{bits}.png"), png_bytes(gsmall >> (8 - bits), 0, bits))
    pal = rng.integers(0, 256, (16, 3))
    idx = rng.integers(0, 16, (21, 33))
    write(os.path.join(d, "p4.png"), png_bytes(idx, 3, 4, palette=pal))
    write(os.path.join(d, "p8_trns.png"),
          png_bytes(idx, 3, 8, palette=pal, trns=bytes(rng.integers(0, 256, 12).astype(np.uint8))))
    rgbt = (small // 128) * 255
    rgbt[::3, ::2] = (255, 0, 255)  # pixels equal to the tRNS colour (fully transparent)
    write(os.path.join(d, "rgb8_trns.png"),
          png_bytes(rgbt, 2, 8, trns=struct.pack(">HHH", 255, 0, 255)))

    # --- Pillow-encoded variants.
    save("grey.png", Image.fromarray(gsmall), format="PNG")
    rgba = np.dstack([crop, np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))])
    save("rgba_gradient.png", Image.fromarray(rgba, "RGBA"), format="PNG")
    for sub, tag in [(0, "444"), (1, "422"), (2, "420")]:
        save(f"crop_{tag}.jpg", Image.fromarray(crop), format="JPEG", quality=85, subsampling=sub)
    save("crop_progressive.jpg", Image.fromarray(crop), format="JPEG", quality=80, progressive=True)
    save("crop_odd.jpg", Image.fromarray(chelsea[50:87, 60:101]), format="JPEG", quality=90)
    save("grey.jpg", Image.fromarray(gsmall), format="JPEG", quality=90)
    save("cmyk.jpg", Image.fromarray(crop).convert("CMYK"), format="JPEG", quality=90)
    # Garbage bytes before the EOI marker: libjpeg warns ("Corrupt JPEG data: 3 extraneous
    # bytes before marker 0xd9"), Pillow ignores the warning and decodes the image.
    jpg = open(os.path.join(d, "crop_420.jpg"), "rb").read()
    assert jpg[-2:] == b"\xff\xd9"
    write(os.path.join(d, "extraneous_bytes.jpg"), jpg[:-2] + b"\x01\x02\x03" + jpg[-2:])
    # A stray RST5 marker in the middle of the entropy-coded data: libjpeg warns "Corrupt JPEG
    # data: premature end of data segment" (TurboJPEG returns an error code), Pillow ignores
    # the warning and returns the (damaged) image.
    mid = len(jpg) // 2
    write(os.path.join(d, "corrupt_marker.jpg"), jpg[:mid] + b"\xff\xd5" + jpg[mid:])
    for o in range(1, 9):
        ex = Image.Exif()
        ex[274] = o
        save(f"exif_{o}.jpg", Image.fromarray(chelsea[100:130, 180:220]), format="JPEG",
             quality=90, exif=ex.tobytes())
    ex = Image.Exif()
    ex[274] = 6
    save("exif_6.png", Image.fromarray(small), format="PNG", exif=ex.tobytes())
    save("lossless.webp", Image.fromarray(crop), format="WEBP", lossless=True)
    save("lossy.webp", Image.fromarray(crop), format="WEBP", quality=80)
    save("rgba_lossless.webp", Image.fromarray(rgba, "RGBA"), format="WEBP", lossless=True)
    save("rgb.bmp", Image.fromarray(small), format="BMP")
    save("p8.bmp", Image.fromarray(small).quantize(16), format="BMP")
    save("grey.bmp", Image.fromarray(gsmall), format="BMP")
    save("rgb.tif", Image.fromarray(small), format="TIFF")
    save("rgb_lzw.tif", Image.fromarray(small), format="TIFF", compression="tiff_lzw")
    save("rgb_deflate.tif", Image.fromarray(small), format="TIFF", compression="tiff_adobe_deflate")
    save("grey16.tif", Image.fromarray((gsmall.astype(np.uint16) * 3)), format="TIFF")
    save("p.gif", Image.fromarray(small).quantize(32), format="GIF")
    gif_t = Image.fromarray(small).quantize(32)
    save("p_trns.gif", gif_t, format="GIF", transparency=3)

    cases = []
    for name in sorted(os.listdir(d)):
        path = os.path.join(d, name)
        im = Image.open(path)
        mode = im.mode
        rgb = np.array(im.convert("RGB"))
        case = {"file": f"images/{name}", "pil_mode": mode, "format": im.format,
                "height": rgb.shape[0], "width": rgb.shape[1], "rgb_fnv": fnv1a64_np(rgb)}
        arrays = {}
        # Arrays (for diagnostics) only where a decoder difference is plausible; every case
        # is checked exactly through the hash.
        if rgb.size <= 64 * 64 * 3 and case["format"] in ("JPEG", "WEBP", "GIF"):
            arrays[f"{name}/rgb"] = rgb
        im = Image.open(path)
        comp = convert_to_rgb(im, return_numpy=True)
        if not np.array_equal(comp, rgb):
            case["composite_fnv"] = fnv1a64_np(comp)
            if comp.size <= 64 * 64 * 3:
                arrays[f"{name}/composite"] = comp
        im = Image.open(path)
        tr = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        if tr.shape != rgb.shape or not np.array_equal(tr, rgb):
            case["exif_height"], case["exif_width"] = tr.shape[:2]
            case["exif_fnv"] = fnv1a64_np(tr)
            arrays[f"{name}/exif"] = tr
        cases.append((case, arrays))
    return cases


def make_bad():
    d = os.path.join(OUT, "bad")
    os.makedirs(d, exist_ok=True)
    png = open(os.path.join(SKDATA, "horse.png"), "rb").read()
    jpg = open(os.path.join(OUT, "images", "crop_420.jpg"), "rb").read()
    write(os.path.join(d, "truncated.png"), png[: len(png) // 2])
    write(os.path.join(d, "truncated.jpg"), jpg[: len(jpg) // 2])
    write(os.path.join(d, "empty.png"), b"")
    write(os.path.join(d, "not_an_image.png"), b"this is a text file, not a PNG\n" * 4)
    write(os.path.join(d, "zero_width.png"), png_bytes(np.zeros((4, 1), np.uint8), 0, 8, width=0))
    # 20000 x 20000 = 4e8 pixels > 2 * MAX_IMAGE_PIXELS; the IDAT holds a single row only.
    write(os.path.join(d, "bomb.png"), png_bytes(np.zeros((1, 8), np.uint8), 0, 8,
                                                  width=20000, height=20000))
    expected = {}
    for name in sorted(os.listdir(d)):
        try:
            with Image.open(os.path.join(d, name)) as im:
                im.load()
                expected[name] = "ok?"
        except Exception as e:  # noqa: BLE001 - we record what Pillow says
            # Messages name the file; keep them independent of the checkout location.
            expected[name] = f"{type(e).__name__}: {e}".replace(d + os.sep, "bad/")
    for k, v in expected.items():
        assert v != "ok?", f"Pillow accepted bad/{k}"
    return expected


def make_maps(rng):
    d = os.path.join(OUT, "maps")
    os.makedirs(d, exist_ok=True)
    h, w = 30, 45
    lab = np.zeros((h, w), np.uint8)
    # Blocks of labels 0..20, some 255 (ignore) stripes, and a few single pixels.
    for i in range(0, h, 6):
        for j in range(0, w, 9):
            lab[i:i + 6, j:j + 9] = rng.integers(0, 21)
    lab[:, 20:22] = 255
    lab[14, :] = 255
    lab[rng.integers(0, h, 10), rng.integers(0, w, 10)] = rng.integers(1, 21, 10)
    Image.fromarray(lab, "L").save(os.path.join(d, "labels_L.png"))
    pim = Image.fromarray(lab, "L").convert("P")
    pim.putpalette(list(rng.integers(0, 256, 768).astype(np.uint8)))
    # convert("P") from L keeps the values as indices with a grey palette; replace the palette
    # with a random one so that a decoder expanding the palette would be caught.
    pim = Image.frombytes("P", (w, h), lab.tobytes())
    pim.putpalette(list(rng.integers(0, 256, 768).astype(np.uint8)))
    pim.save(os.path.join(d, "labels_P.png"))
    assert np.array_equal(np.array(Image.open(os.path.join(d, "labels_P.png"))), lab)
    # Image matching the map size (the map's companion photo).
    chelsea = Image.open(os.path.join(SKDATA, "chelsea.png")).convert("RGB")
    Image.fromarray(np.array(chelsea)[90:120, 170:215]).save(os.path.join(d, "photo.png"))


def processor_cases(rng):
    """Returns (cases, arrays)."""
    cases = []
    arrays = {}
    img_dir = os.path.join(OUT, "images")

    def load(name):
        return Image.open(os.path.join(OUT, name))

    def run(name, image_file, config, *, crop_box=None, convert="rgb", store_pixel_values=None,
            map_file=None, transformers_kwargs=None, note=None):
        """convert: 'rgb' = Image.open().convert('RGB') passed in; 'composite' = the opened
        image passed with do_convert_rgb=True (transformers composites alpha onto white)."""
        if convert == "composite":
            config = dict(config, do_convert_rgb=True)
        im = load(image_file)
        if convert == "rgb":
            im = im.convert("RGB")
        if crop_box is not None:
            im = im.crop(crop_box)
        proc = BeitImageProcessorPil.from_dict(dict(config))
        kwargs = dict(transformers_kwargs or {})
        seg = None
        if map_file is not None:
            seg = load(map_file)
            if crop_box is not None:
                seg = seg.crop(crop_box)
        out = proc(images=im, segmentation_maps=seg, return_tensors="np", **kwargs)
        pv = out["pixel_values"][0]
        case = {"name": name, "image": image_file, "config": config, "convert": convert,
                "pixel_values_shape": list(pv.shape)}
        if crop_box is not None:
            case["crop_box"] = list(crop_box)
        if note:
            case["note"] = note
        # Pillow's own resize of the same RGB input (what the Rust resampler must equal).
        rgb = im if convert == "rgb" else Image.fromarray(convert_to_rgb(im, return_numpy=True))
        target = None
        if proc.do_resize and not proc.do_center_crop:
            target = pv.shape[1:]
        elif proc.do_resize and proc.size.height is not None:
            target = (proc.size.height, proc.size.width)
        if target is not None:
            resized = np.array(rgb.resize((int(target[1]), int(target[0])), proc.resample,
                                          reducing_gap=None))
            arrays[f"{name}/resized"] = resized
            # pixel_values must be a per-channel function of the resized bytes (checked via a
            # lookup table when the array itself is not stored).
            if not proc.do_center_crop:
                lut = pixel_lut(proc)
                recon = np.stack([lut[c][resized[..., c]] for c in range(3)])
                assert np.array_equal(recon, pv), name
        if store_pixel_values is None:
            store_pixel_values = pv.size <= 3000
        case["pixel_values_fnv"] = fnv1a64_np(pv.astype("<f4"))
        if store_pixel_values:
            arrays[f"{name}/pixel_values"] = pv.astype(np.float32)
        if map_file is not None:
            case["map"] = map_file
            labels = out["labels"][0]
            assert labels.dtype == np.int64
            arrays[f"{name}/labels"] = labels
        cases.append(case)

    v5_default = BeitImageProcessorPil().to_dict()
    v5_default = {k: v for k, v in v5_default.items() if not k.startswith("_")}
    for k in list(v5_default):
        if v5_default[k] is None:
            del v5_default[k]

    def v5(**kw):
        c = {"image_processor_type": "BeitImageProcessor"}
        c.update({k: (dict(v) if hasattr(v, "keys") else (list(v) if isinstance(v, tuple) else v))
                  for k, v in v5_default.items()
                  if k in ("do_resize", "size", "resample", "do_center_crop", "crop_size",
                           "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                           "image_std", "do_reduce_labels")})
        for k in ("size", "crop_size"):
            c[k] = {kk: vv for kk, vv in c[k].items() if vv is not None}
        c["resample"] = int(c["resample"])
        c.update(kw)
        return c

    def legacy(size, resample, **kw):
        c = {"crop_size": 224, "do_center_crop": False, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "BeitFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
             "image_std": [0.5, 0.5, 0.5], "reduce_labels": False, "resample": resample,
             "size": size}
        c.update(kw)
        return c

    # Real hub default: microsoft/beit-base-patch16-224 (legacy file: 224, BILINEAR, no crop),
    # and the 5.x default (224, BICUBIC), on the full photos. The 224x224 float arrays are big,
    # so the resized bytes are stored and pixel_values are checked via the lookup table.
    run("chelsea_hub_legacy_224", "images/chelsea.png", legacy(224, 2))
    run("rocket_v5_default_224", "images/rocket.jpg", v5())

    # Every filter, down- and up-scaling, non-square, with and without crop, on colour, grey,
    # RGBA (alpha dropped, and composited) and JPEG inputs.
    srcs = [("chelsea", "images/chelsea.png", "rgb"), ("rocket", "images/rocket.jpg", "rgb"),
            ("micro", "images/microaneurysms.png", "rgb"), ("horse", "images/horse.png", "rgb"),
            ("horse_composite", "images/horse.png", "composite")]
    for stem, img, conv in srcs:
        for f in range(6):
            fn = FILTERS[f].lower()
            run(f"{stem}_{fn}_down_24x32", img, v5(size={"height": 24, "width": 32}, resample=f),
                convert=conv)
            run(f"{stem}_{fn}_up_crop", img, v5(size={"height": 36, "width": 48}, resample=f),
                convert=conv, crop_box=(60, 40, 83, 57))
            run(f"{stem}_{fn}_legacy_crop", img,
                legacy(40, f, do_center_crop=True, crop_size=30), convert=conv)
    # Semi-transparent RGBA: alpha gradient, composited vs dropped.
    for conv in ("rgb", "composite"):
        run(f"rgba_gradient_{conv}", "images/rgba_gradient.png",
            v5(size={"height": 20, "width": 30}, resample=2), convert=conv)
    # Grey JPEG, CMYK JPEG, palette PNG with transparency, 16-bit.
    for img in ["images/grey.jpg", "images/cmyk.jpg", "images/p8_trns.png", "images/rgb16.png",
                "images/g16.png", "images/lossless.webp"]:
        stem = os.path.basename(img).replace(".", "_")
        run(f"{stem}_bicubic_17x13", img, v5(size={"height": 13, "width": 17}))
    run("p8_trns_composite", "images/p8_trns.png", v5(size={"height": 13, "width": 17}),
        convert="composite")
    # Crop larger than the resized image (zero padding), odd differences, no resize.
    run("chelsea_pad_crop", "images/chelsea.png",
        v5(size={"height": 20, "width": 26}, do_center_crop=True,
           crop_size={"height": 25, "width": 31}))
    run("chelsea_mixed_crop", "images/chelsea.png",
        v5(size={"height": 21, "width": 40}, do_center_crop=True,
           crop_size={"height": 28, "width": 13}))
    run("micro_no_resize_crop", "images/microaneurysms.png",
        v5(do_resize=False, do_center_crop=True, crop_size={"height": 17, "width": 110}))
    # Other size rules (aspect-preserving).
    run("chelsea_shortest_edge", "images/chelsea.png", v5(size={"shortest_edge": 20}, resample=2))
    run("chelsea_shortest_longest", "images/chelsea.png",
        v5(size={"shortest_edge": 20, "longest_edge": 25}, resample=2))
    run("chelsea_max_hw", "images/chelsea.png",
        v5(size={"max_height": 19, "max_width": 23}, resample=3))
    run("rocket_size_list", "images/rocket.jpg", v5(size=[18, 27], resample=1))
    # Rescale/normalize variants.
    run("micro_imagenet_norm", "images/microaneurysms.png",
        v5(size={"height": 16, "width": 16}, image_mean=[0.485, 0.456, 0.406],
           image_std=[0.229, 0.224, 0.225]))
    run("micro_no_normalize", "images/microaneurysms.png",
        v5(size={"height": 16, "width": 16}, do_normalize=False))
    run("micro_no_rescale", "images/microaneurysms.png",
        v5(size={"height": 16, "width": 16}, do_rescale=False, image_mean=127.5, image_std=2.0))
    run("micro_custom_rescale", "images/microaneurysms.png",
        v5(size={"height": 16, "width": 16}, rescale_factor=0.0033, image_mean=[0.1, 0.2, 0.3],
           image_std=[0.7, 0.8, 0.9]))

    # Segmentation maps (labels resized with the images' resample, as transformers does).
    for mapf in ["maps/labels_L.png", "maps/labels_P.png"]:
        stem = os.path.basename(mapf).split(".")[0]
        for reduce in (False, True):
            for f, size in [(3, {"height": 20, "width": 33}), (0, {"height": 48, "width": 64}),
                            (2, {"height": 30, "width": 45})]:
                run(f"{stem}_reduce{int(reduce)}_{FILTERS[f].lower()}_{size['height']}",
                    "maps/photo.png", v5(size=size, resample=f, do_reduce_labels=reduce),
                    map_file=mapf)
        run(f"{stem}_crop_pad", "maps/photo.png",
            v5(size={"height": 20, "width": 30}, resample=0, do_center_crop=True,
               crop_size={"height": 24, "width": 26}, do_reduce_labels=True), map_file=mapf)
    # Legacy `reduce_labels: true`: transformers 5.24 ignores the legacy key (the attribute is
    # set but never read); the Rust processor honours it as v4 did, so the expected values are
    # generated with do_reduce_labels=True passed explicitly.
    p = BeitImageProcessorPil.from_dict(legacy(24, 3, reduce_labels=True))
    assert p.do_reduce_labels is False and getattr(p, "reduce_labels") is True
    run("labels_legacy_reduce_labels", "maps/photo.png", legacy(24, 3, reduce_labels=True),
        map_file="maps/labels_L.png", transformers_kwargs={"do_reduce_labels": True},
        note="transformers 5.24 ignores legacy reduce_labels; expected uses do_reduce_labels=True")
    return cases, arrays


def pixel_lut(proc):
    """pixel_values for every uint8 value per channel, computed by transformers itself."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (1, 1, 3))
    p = BeitImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=proc.do_rescale,
                              rescale_factor=proc.rescale_factor, do_normalize=proc.do_normalize,
                              image_mean=proc.image_mean, image_std=proc.image_std)
    out = p(images=Image.fromarray(ramp), return_tensors="np")["pixel_values"][0]
    return [out[c, 0] for c in range(3)]


def config_cases():
    d = os.path.join(OUT, "configs")
    os.makedirs(d, exist_ok=True)
    configs = {
        # microsoft/beit-base-patch16-224 (legacy feature-extractor file).
        "legacy_beit_base.json": {"crop_size": 224, "do_center_crop": False, "do_normalize": True,
                                  "do_resize": True,
                                  "feature_extractor_type": "BeitFeatureExtractor",
                                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                                  "reduce_labels": False, "resample": 2, "size": 224},
        "legacy_ade.json": {"do_center_crop": False, "do_normalize": True, "do_resize": True,
                            "feature_extractor_type": "BeitFeatureExtractor",
                            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                            "reduce_labels": True, "resample": 3, "size": 640},
        "empty.json": {},
        "v5_shortest_edge.json": {"image_processor_type": "BeitImageProcessor",
                                  "size": {"shortest_edge": 256}, "do_center_crop": True,
                                  "crop_size": {"height": 224, "width": 224}, "unknown_key": 1},
        "v5_default_to_square_false.json": {"size": 300, "default_to_square": False},
        "v5_scalar_mean.json": {"image_mean": 0.3, "image_std": 0.2, "do_convert_rgb": True,
                                "rescale_factor": 0.5, "size": [100, 50]},
    }
    # The file transformers itself writes for the 5.x default processor.
    tmp = os.path.join(d, "_tmp")
    BeitImageProcessorPil().save_pretrained(tmp)
    with open(os.path.join(tmp, "preprocessor_config.json")) as f:
        configs["v5_saved_default.json"] = json.load(f)
    shutil.rmtree(tmp)
    expected = {}
    for name, cfg in configs.items():
        with open(os.path.join(d, name), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        p = BeitImageProcessorPil.from_dict(dict(cfg))

        def sd(s):
            return {k: v for k, v in dict(s).items() if v is not None}

        expected[name] = {
            "do_resize": bool(p.do_resize), "size": sd(p.size), "resample": int(p.resample),
            "do_center_crop": bool(p.do_center_crop), "crop_size": sd(p.crop_size),
            "do_rescale": bool(p.do_rescale), "rescale_factor": float(p.rescale_factor),
            "do_normalize": bool(p.do_normalize),
            "image_mean": [float(x) for x in (p.image_mean if isinstance(p.image_mean, (list, tuple)) else [p.image_mean] * 3)],
            "image_std": [float(x) for x in (p.image_std if isinstance(p.image_std, (list, tuple)) else [p.image_std] * 3)],
            "do_reduce_labels": bool(p.do_reduce_labels or getattr(p, "reduce_labels", False)),
            "transformers_do_reduce_labels": bool(p.do_reduce_labels),
            "do_convert_rgb": p.do_convert_rgb,
        }
    # Invalid configs (must be rejected with an error).
    invalid = {
        "bad_resample.json": {"resample": 9},
        "bad_size_keys.json": {"size": {"height": 10}},
        "bad_mean_len.json": {"image_mean": [0.5, 0.5]},
        "bad_crop_for_center_crop.json": {"do_center_crop": True, "crop_size": {"shortest_edge": 3}},
        "null_size_with_resize.json": {"size": None},
    }
    for name, cfg in invalid.items():
        with open(os.path.join(d, name), "w") as f:
            json.dump(cfg, f)
    with open(os.path.join(d, "not_json.json"), "w") as f:
        f.write("{ this is not json")
    return expected, sorted(list(invalid) + ["not_json.json"])


def sweep_cases(rng, n_random=240):
    """Random Pillow resizes of random images: all filters, up/down, non-square, 1 and 3
    channels, plus pass-order tie cases (2 * (src_w - dst_w) == src_h - dst_h)."""
    cases, arrays = [], {}
    shapes = []
    for _ in range(n_random):
        w, h = (int(x) for x in rng.integers(1, 25, 2))
        ow, oh = (int(x) for x in rng.integers(1, 41, 2))
        shapes.append((w, h, ow, oh))
    for _ in range(30):  # ties and their neighbours
        h = int(rng.integers(4, 25))
        oh = int(rng.integers(1, h))
        dd = h - oh
        if dd % 2:
            oh -= 1 if oh > 1 else -1
            dd = h - oh
        w = int(rng.integers(dd // 2 + 1, 25))
        ow = w - dd // 2
        shapes += [(w, h, ow, oh), (w, h, ow + 1, oh)]
    shapes += [(1, 1, 5, 7), (7, 1, 1, 1), (1, 9, 3, 1), (24, 24, 1, 40), (3, 2, 40, 1)]
    for i, (w, h, ow, oh) in enumerate(shapes):
        f = int(rng.integers(0, 6)) if i >= 6 else i
        c = int(rng.choice([1, 3]))
        kind = int(rng.integers(0, 3))
        if kind == 0:  # white noise: exercises clipping
            src = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        elif kind == 1:  # smooth gradient + noise
            yy, xx = np.mgrid[0:h, 0:w]
            base = (xx * 7 + yy * 13)[..., None] + np.arange(c) * 50
            src = np.clip(base + rng.integers(-20, 21, (h, w, c)), 0, 255).astype(np.uint8)
        else:  # extremes only
            src = (rng.integers(0, 2, (h, w, c)) * 255).astype(np.uint8)
        im = Image.fromarray(src[..., 0] if c == 1 else src)
        out = np.array(im.resize((ow, oh), f, reducing_gap=None))
        if out.ndim == 2:
            out = out[..., None]
        key = f"case{i:03d}"
        arrays[f"{key}/src"] = src
        arrays[f"{key}/dst"] = out
        cases.append({"key": key, "src_w": w, "src_h": h, "dst_w": ow, "dst_h": oh,
                      "channels": c, "filter": f})
    return cases, arrays


def extended(out_dir, n_random, seed):
    """Large verification set (not committed): a big random resize sweep in the sweep.json
    format, and every skimage photo decoded and resized with every filter to several sizes
    (expected outputs as FNV-1a 64 hashes). Used by the ignored test `extended_parity`."""
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases, arrays = [], {}
    for i in range(n_random):
        w, h = (int(x) for x in rng.integers(1, 129, 2))
        ow, oh = (int(x) for x in rng.integers(1, 193, 2))
        f = i % 6
        c = int(rng.choice([1, 3]))
        if rng.integers(0, 2):
            src = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            base = (xx * 3 + yy * 5)[..., None] + np.arange(c) * 40
            src = np.clip(base % 256 + rng.integers(-30, 31, (h, w, c)), 0, 255).astype(np.uint8)
        im = Image.fromarray(src[..., 0] if c == 1 else src)
        out = np.array(im.resize((ow, oh), f, reducing_gap=None))
        out = out[..., None] if out.ndim == 2 else out
        key = f"case{i:05d}"
        arrays[f"{key}/src"] = src
        arrays[f"{key}/dst"] = out
        cases.append({"key": key, "src_w": w, "src_h": h, "dst_w": ow, "dst_h": oh,
                      "channels": c, "filter": f})
    save_file(arrays, os.path.join(out_dir, "sweep.safetensors"))
    with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
        json.dump({"cases": cases}, fh)

    photos = []
    sizes = [(224, 224), (384, 384), (640, 640), (97, 61), (61, 97), (333, 17), (1, 1)]
    for name in sorted(os.listdir(SKDATA)):
        if not name.endswith((".png", ".jpg")):
            continue
        path = os.path.join(SKDATA, name)
        try:
            im = Image.open(path)
            im.load()
        except Exception:  # noqa: BLE001
            continue
        rgb = im.convert("RGB")
        entry = {"file": path, "width": rgb.width, "height": rgb.height,
                 "rgb_fnv": fnv1a64_np(np.array(rgb)), "resized": []}
        for f in range(6):
            for (w, h) in sizes:
                out = np.array(rgb.resize((w, h), f, reducing_gap=None))
                entry["resized"].append({"filter": f, "width": w, "height": h,
                                         "fnv": fnv1a64_np(out)})
        photos.append(entry)
    with open(os.path.join(out_dir, "photos.json"), "w") as fh:
        json.dump({"photos": photos}, fh, indent=0)
    print(f"wrote {out_dir}: {len(cases)} sweep cases, {len(photos)} photos")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--any-version", action="store_true")
    ap.add_argument("--extended", metavar="DIR",
                    help="write the large (uncommitted) verification set to DIR instead")
    ap.add_argument("--extended-cases", type=int, default=3000)
    args = ap.parse_args()
    versions = {"transformers": transformers.__version__, "Pillow": PIL.__version__,
                "numpy": np.__version__, "scikit-image": skimage.__version__,
                "libjpeg_turbo": features.version_feature("libjpeg_turbo"),
                "webp": features.version("webp"), "zlib": features.version("zlib")}
    if not args.any_version and (versions["transformers"] != "5.24.0"
                                 or versions["Pillow"] != "13.0.0"):
        sys.exit(f"expected transformers 5.24.0 and Pillow 13.0.0, got {versions}")
    if args.extended:
        extended(args.extended, args.extended_cases, 7)
        return
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    rng = np.random.default_rng(20240613)

    decode = make_images(rng)
    bad = make_bad()
    make_maps(rng)
    dec_arrays = {}
    dec_cases = []
    for case, arrs in decode:
        dec_cases.append(case)
        dec_arrays.update(arrs)
    save_file(dec_arrays, os.path.join(OUT, "decode.safetensors"))
    with open(os.path.join(OUT, "decode.json"), "w") as f:
        json.dump({"versions": versions, "cases": dec_cases, "bad": bad}, f, indent=1)

    cases, arrays = processor_cases(rng)
    save_file(arrays, os.path.join(OUT, "processor.safetensors"))
    cfg_expected, cfg_invalid = config_cases()
    with open(os.path.join(OUT, "processor.json"), "w") as f:
        json.dump({"versions": versions, "cases": cases, "configs": cfg_expected,
                   "invalid_configs": cfg_invalid}, f, indent=1)

    sw_cases, sw_arrays = sweep_cases(rng)
    save_file(sw_arrays, os.path.join(OUT, "sweep.safetensors"))
    with open(os.path.join(OUT, "sweep.json"), "w") as f:
        json.dump({"versions": versions, "cases": sw_cases}, f, indent=0)

    total = 0
    for dp, _, fns in os.walk(OUT):
        for fn in fns:
            total += os.path.getsize(os.path.join(dp, fn))
    print(f"wrote {OUT}: {total / 1e6:.2f} MB, {len(dec_cases)} decode cases, "
          f"{len(cases)} processor cases, {len(sw_cases)} sweep cases")


if __name__ == "__main__":
    main()
