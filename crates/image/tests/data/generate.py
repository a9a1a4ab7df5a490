"""Regenerates the llava-image test fixtures in this folder from Pillow and transformers.

    /opt/refenv/bin/python crates/image/tests/data/generate.py

Pinned: Pillow 13.0.0 (its resize pass order changed in 13), transformers 5.24.0, numpy 2.4.6, no
torchvision (transformers would pick its image backend instead of PIL).

Writes:
- resize.json: Pillow BICUBIC resizes of the synthetic RGB pattern, with the pass order Pillow took
  (found by comparing with explicit horizontal-then-vertical and vertical-then-horizontal resizes).
- convert.json: sha256 of transformers' convert_to_rgb for every (value, alpha) pair, RGBA and LA.
- decode/*: small files in many PNG/GIF/WebP/JPEG variants; decode.json: sha256 of what transformers
  builds from each (PIL open + convert_to_rgb), and for lossy JPEG the RGB bytes (decode/*.rgb).
- preprocess_files.json: sha256 of LlavaNextImageProcessor (PIL backend) pixel_values of some files.
"""

import hashlib
import importlib.util
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

HERE = Path(__file__).resolve().parent
PINNED = {"PIL": "13.0.0", "transformers": "5.24.0", "numpy": "2.4.6"}


def check_environment():
    found = {"PIL": PIL.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    if found != PINNED:
        sys.exit(f"expected {PINNED}, found {found}")
    if importlib.util.find_spec("torchvision") is not None:
        sys.exit("torchvision is importable: uninstall it so that transformers uses PIL")


def sha256(data) -> str:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()


def synthetic(width, height, channels):
    """The pattern shared with tests/reference/generate.py (x column, y row)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    planes = {
        1: [(3 * x + 5 * y) % 256],
        2: [(3 * x + 5 * y) % 256, (5 * x + 11 * y) % 256],
        3: [(7 * x + 13 * y) % 256, (x * y + 3 * x) % 256, (x ^ y) % 256],
        4: [(7 * x + 13 * y) % 256, (x * y + 3 * x) % 256, (x ^ y) % 256, (5 * x + 11 * y) % 256],
    }[channels]
    return np.stack(planes, axis=-1).astype(np.uint8)


def write_json(name, value):
    (HERE / name).write_text(json.dumps(value, indent=1) + "\n")


# (width, height) -> (new width, new height). Pillow 13 goes vertical first iff
# H > h and H - h > 2 * (W - w); the cases cover both orders where both passes run.
RESIZES = [
    ((800, 600), (672, 504)),
    ((600, 800), (504, 672)),
    ((300, 1000), (101, 336)),
    ((400, 1000), (336, 336)),
    ((700, 900), (600, 500)),
    ((700, 900), (500, 600)),
    ((1, 2000), (336, 336)),
    ((2000, 1), (336, 336)),
    ((13, 1000), (13, 336)),
    ((1000, 13), (336, 5)),
    ((451, 300), (672, 447)),
    ((640, 427), (336, 336)),
    ((337, 1009), (336, 1008)),
    ((5, 7), (336, 336)),
    ((1, 1), (336, 336)),
    ((336, 336), (336, 336)),
    ((3000, 2000), (672, 448)),
    ((1200, 2500), (161, 336)),
]


def resize_cases():
    cases = []
    for (w, h), (nw, nh) in RESIZES:
        im = Image.fromarray(synthetic(w, h, 3))
        out = np.asarray(im.resize((nw, nh), Image.BICUBIC))
        h_first = np.asarray(im.resize((nw, h), Image.BICUBIC).resize((nw, nh), Image.BICUBIC))
        v_first = np.asarray(im.resize((w, nh), Image.BICUBIC).resize((nw, nh), Image.BICUBIC))
        if (out == h_first).all() and (out == v_first).all():
            order = "either"
        elif (out == h_first).all():
            order = "horizontal_first"
        elif (out == v_first).all():
            order = "vertical_first"
        else:
            sys.exit(f"{w}x{h} -> {nw}x{nh}: matches neither explicit pass order")
        cases.append({"src": [w, h], "dst": [nw, nh], "order": order, "sha256": sha256(out)})
    return cases


def convert_cases():
    """Every (value, alpha) pair: pixel (x, y) has value x and alpha y."""
    y, x = np.mgrid[0:256, 0:256].astype(np.uint8)
    rgba = np.stack([x, 255 - x, x * 7, y], axis=-1)
    la = np.stack([x, y], axis=-1)
    return {
        "rgba_256x256": sha256(convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True)),
        "la_256x256": sha256(convert_to_rgb(Image.fromarray(la, "LA"), return_numpy=True)),
    }


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(samples, bit_depth, color_type, palette=None, trns=None):
    """A minimal PNG writer for what Pillow cannot save (low/16-bit depths, tRNS on 16-bit)."""
    height, width = samples.shape[:2]
    rows = []
    for row in samples.reshape(height, width, -1):
        if bit_depth == 16:
            rows.append(row.astype(">u2").tobytes())
        elif bit_depth == 8:
            rows.append(row.astype(np.uint8).tobytes())
        else:
            values = row.reshape(-1).tolist()
            per_byte = 8 // bit_depth
            values += [0] * (-len(values) % per_byte)
            packed = bytearray()
            for i in range(0, len(values), per_byte):
                byte = 0
                for v in values[i : i + per_byte]:
                    byte = (byte << bit_depth) | v
                packed.append(byte)
            rows.append(bytes(packed))
    data = b"".join(b"\x00" + r for r in rows)
    out = b"\x89PNG\r\n\x1a\n"
    out += png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += png_chunk(b"PLTE", bytes(palette))
    if trns is not None:
        out += png_chunk(b"tRNS", bytes(trns))
    return out + png_chunk(b"IDAT", zlib.compress(data)) + png_chunk(b"IEND", b"")


def saved(image, fmt, **params):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode_files():
    """name -> encoded bytes. Sizes are odd so that edge blocks and subsampling are partial."""
    w, h = 37, 23
    rgb, rgba = synthetic(w, h, 3), synthetic(w, h, 4)
    gray, la = synthetic(w, h, 1)[..., 0], synthetic(w, h, 2)
    y, x = np.mgrid[0:h, 0:w]
    wide16 = ((x * 1789 + y * 2713) % 65536).astype(np.int64)
    palette = [(i * 37) % 256 for i in range(3 * 16)]
    indices = ((x + 3 * y) % 16).astype(np.uint8)
    p_image = Image.fromarray(indices, "P")
    p_image.putpalette(palette)
    files = {
        "gray1.png": raw_png((x + y) % 2, 1, 0),
        "gray2.png": raw_png((x + y) % 4, 2, 0),
        "gray4.png": raw_png((x + y) % 16, 4, 0),
        "gray8.png": saved(Image.fromarray(gray, "L"), "PNG"),
        "gray8_trns.png": raw_png(gray, 8, 0, trns=struct.pack(">H", int(gray[1, 1]))),
        "gray16.png": raw_png(wide16 % 600, 16, 0),
        "gray16_trns.png": raw_png(wide16 % 600, 16, 0, trns=struct.pack(">H", int(wide16[1, 1] % 600))),
        "la8.png": saved(Image.fromarray(la, "LA"), "PNG"),
        "la16.png": raw_png(np.stack([wide16, (wide16 * 3) % 65536], -1), 16, 4),
        "rgb8.png": saved(Image.fromarray(rgb), "PNG"),
        "rgb8_trns.png": raw_png(rgb, 8, 2, trns=struct.pack(">HHH", *map(int, rgb[2, 3]))),
        "rgb16.png": raw_png(np.stack([wide16, (wide16 * 5) % 65536, 65535 - wide16], -1), 16, 2),
        "rgb16_trns.png": raw_png(
            np.stack([wide16, wide16, wide16], -1), 16, 2, trns=struct.pack(">HHH", *[int(wide16[0, 1])] * 3)
        ),
        "rgba8.png": saved(Image.fromarray(rgba, "RGBA"), "PNG"),
        "rgba16.png": raw_png(
            np.stack([wide16, (wide16 * 5) % 65536, 65535 - wide16, (wide16 * 7) % 65536], -1), 16, 6
        ),
        "palette.png": saved(p_image, "PNG"),
        "palette_trns.png": raw_png(indices, 8, 3, palette=palette, trns=[(i * 17) % 256 for i in range(16)]),
        "palette4.png": raw_png(indices, 4, 3, palette=palette),
        "palette.gif": saved(p_image, "GIF"),
        "palette_trns.gif": saved(p_image, "GIF", transparency=5),
        "gray.gif": saved(Image.fromarray(gray, "L"), "GIF"),
        "lossless_rgb.webp": saved(Image.fromarray(rgb), "WEBP", lossless=True),
        "lossless_rgba.webp": saved(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True),
        "lossy_rgb.webp": saved(Image.fromarray(rgb), "WEBP", quality=80),
        "lossy_rgba.webp": saved(Image.fromarray(rgba, "RGBA"), "WEBP", quality=80),
        "q90_444.jpg": saved(Image.fromarray(rgb), "JPEG", quality=90, subsampling=0),
        "q90_422.jpg": saved(Image.fromarray(rgb), "JPEG", quality=90, subsampling=1),
        "q90_420.jpg": saved(Image.fromarray(rgb), "JPEG", quality=90, subsampling=2),
        "q75_420_progressive.jpg": saved(Image.fromarray(rgb), "JPEG", quality=75, progressive=True),
        "gray.jpg": saved(Image.fromarray(gray, "L"), "JPEG", quality=90),
    }
    return files


def decode_cases():
    folder = HERE / "decode"
    folder.mkdir(exist_ok=True)
    cases = []
    for name, data in decode_files().items():
        (folder / name).write_bytes(data)
        with Image.open(folder / name) as image:
            image.load()
            rgb = convert_to_rgb(image, return_numpy=True)
            case = {"file": name, "pil_mode": image.mode, "width": image.width, "height": image.height}
        assert rgb.dtype == np.uint8 and rgb.shape == (case["height"], case["width"], 3)
        case["rgb_sha256"] = sha256(rgb)
        if name.endswith(".jpg"):
            (folder / (name + ".rgb")).write_bytes(rgb.tobytes())
        cases.append(case)
    return cases


PROCESSOR_KWARGS = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    resample=3,
    do_center_crop=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
    do_pad=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)


def preprocess_cases():
    processor = LlavaNextImageProcessorPil(**PROCESSOR_KWARGS)
    cases = []
    for name in ["palette_trns.png", "la16.png", "lossy_rgba.webp", "palette_trns.gif"]:
        with Image.open(HERE / "decode" / name) as image:
            image.load()
            pixels = processor(images=image, return_tensors="np")["pixel_values"][0].astype("<f4")
        cases.append({"file": name, "pixels_shape": list(pixels.shape), "pixels_sha256": sha256(pixels)})
    return cases


def main():
    check_environment()
    write_json("resize.json", resize_cases())
    write_json("convert.json", convert_cases())
    write_json("decode.json", decode_cases())
    write_json("preprocess_files.json", preprocess_cases())


if __name__ == "__main__":
    main()
