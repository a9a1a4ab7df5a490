"""Writes small JPEG variants and Pillow's decode of each (tests/fixtures/jpeg/).

    /opt/refenv/bin/python tests/reference/jpeg_cases.py

Needs `jpegtran` (Debian: libjpeg-turbo-progs) for the files with custom scan scripts.

Pillow 13 decodes JPEG with libjpeg-turbo (accurate integer IDCT, fancy upsampling); crates/image
reproduces that byte for byte, and crates/image/tests/jpeg.rs checks every file listed here.
Files are encoded by Pillow (sizes that are not multiples of the MCU, 4:4:4/4:2:2/4:2:0, quality 75
and 95, progressive, greyscale, restart markers, 16-bit quantisation tables) or derived from such a
file by rewriting marker segments (no DHT: libjpeg's standard tables; Adobe transform 0 and 'R','G',
'B' component ids: RGB colour space; changed sampling factors: 4:4:0 and 4:1:1; fill bytes before
markers; one scan per component and custom progressions, rewritten losslessly by jpegtran;
damaged entropy-coded data (cut short before EOI, invalid codes, wrong or missing restart
markers, random bytes), which libjpeg decodes with warnings that Pillow ignores; quantisation
tables replaced by huge ones, which overflow the 16-bit SIMD IDCT that
Pillow's x86-64 libjpeg-turbo runs). "outcome" says what crates/image does with a file: "exact" (Pillow's bytes) or "refused"
(arithmetic coding: its non-exact fallback decoder cannot decode it). progressive_first_5_scans
lacks refinement scans, so libjpeg block-smooths it.

cases.json: [{"file", "width", "height", "pil_mode", "outcome", "rgb_sha256" (sha256 of
Image.open(file).convert("RGB") bytes, HWC), "samples": [[x, y, [r, g, b]], ...]}]
"""

import hashlib
import io
import json
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "jpeg"


def pattern(width, height, channels, seed):
    """Gradients plus noise: smooth areas, edges and detail in every component."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [
        255 * x / max(width - 1, 1),
        255 * y / max(height - 1, 1),
        128 + 100 * np.sin(x / 3 + y / 5),
    ][:channels]
    image = np.stack(planes, -1) + rng.normal(0, 40, (height, width, channels))
    image[height // 3 : height // 2, width // 4 : width // 2] = [255, 0, 40][:channels]  # sharp block
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(width, height, mode="RGB", seed=0, **options):
    array = pattern(width, height, 1 if mode == "L" else 3, seed)
    image = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def segments(data):
    """(marker, start, end) of each marker segment before the first SOS, then ("SOS", start, len)."""
    pos, found = 2, []
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:
            found.append((marker, pos, len(data)))
            return found
        found.append((marker, pos, pos + 2 + length))
        pos += 2 + length


def without(data, marker):
    kept = [data[s:e] for m, s, e in segments(data) if m != marker]
    return data[:2] + b"".join(kept)


def with_adobe_rgb(data):
    """Replaces the JFIF APP0 with an Adobe APP14 marker saying transform 0 (no colour transform)."""
    adobe = b"\xff\xee" + struct.pack(">H", 14) + b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0)
    return data[:2] + adobe + without(data, 0xE0)[2:]


def with_rgb_ids(data):
    """No JFIF marker and component ids 'R', 'G', 'B' in SOF and SOS: libjpeg guesses RGB."""
    data = bytearray(without(data, 0xE0))
    for marker, start, _ in segments(bytes(data)):
        if marker in (0xC0, 0xC2):
            for i, cid in enumerate(b"RGB"):
                data[start + 10 + 3 * i] = cid
        if marker == 0xDA:
            count = data[start + 4]
            for i in range(count):
                data[start + 5 + 2 * i] = b"RGB"[data[start + 5 + 2 * i] - 1]
    return bytes(data)


def with_sampling(data, luma_factors, width, height):
    """Rewrites the frame's luma sampling byte and size (same blocks per MCU and MCU count)."""
    data = bytearray(data)
    for marker, start, _ in segments(bytes(data)):
        if marker == 0xC0:
            data[start + 5 : start + 9] = struct.pack(">HH", height, width)
            data[start + 11] = luma_factors
    return bytes(data)


def with_fill_bytes(data):
    """Extra 0xFF fill bytes before every marker of the header and before EOI."""
    out = bytearray(data[:2])
    for _, start, end in segments(data):
        out += b"\xff\xff\xff" + data[start:end]
    assert out.endswith(b"\xff\xd9")
    return bytes(out[:-2] + b"\xff\xff\xd9")


def with_flat_quant(data, value):
    """Every quantisation table set to `value` (16-bit entries above 255). Encoded with all-ones
    tables, the coefficients then dequantise to far outside the sample range."""
    out = bytearray(data[:2])
    for marker, start, end in segments(data):
        if marker != 0xDB:
            out += data[start:end]
            continue
        body, tables = data[start + 4 : end], b""
        while body:
            size = 128 if body[0] >> 4 else 64
            precision = 1 if value > 255 else 0
            entries = struct.pack(">64H", *[value] * 64) if precision else bytes([value] * 64)
            tables += bytes([(precision << 4) | (body[0] & 15)]) + entries
            body = body[1 + size :]
        out += b"\xff\xdb" + struct.pack(">H", 2 + len(tables)) + tables
    return bytes(out)


def jpegtran(data, scans, *options):
    """Lossless rewrite of `data` with the scan script `scans` (jpegtran -scans)."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "scans.txt"
        script.write_text(scans)
        command = ["jpegtran", *options, "-scans", str(script)]
        return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def entropy_start(data):
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


def corrupted(data, kind, seed=0):
    """Damaged entropy-coded data that libjpeg decodes with warnings only (Pillow ignores them)."""
    start, data = entropy_start(data), bytearray(data)
    if kind == "short":  # the scan stops half way, then EOI
        return bytes(data[: (start + len(data)) // 2]) + b"\xff\xd9"
    if kind == "all_ones":  # stuffed FF bytes: no Huffman code is all ones
        data[start : start + 8] = b"\xff\x00" * 4
    elif kind.startswith("rst"):  # the first RST0 replaced by RSTn, or removed
        rst0 = data.index(b"\xff\xd0", start)
        if kind == "rst_missing":
            del data[rst0 : rst0 + 2]
        else:
            data[rst0 + 1] = 0xD0 + int(kind[3:])
    elif kind == "noise":  # random bytes changed (a few become markers)
        rng = np.random.default_rng(seed)
        for i in rng.integers(start, len(data) - 2, 6):
            data[i] = int(rng.integers(0, 256))
    return bytes(data)


def without_last_scans(data, keep):
    """A progressive file cut after `keep` scans, closed with EOI."""
    pos, scans = 2, 0
    while True:
        marker = data[pos + 1]
        if marker == 0xDA:
            scans += 1
            if scans > keep:
                return data[:pos] + b"\xff\xd9"
            pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            while not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1
            continue
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]


def cases():
    q95_444 = encode(24, 16, quality=95, subsampling=0, seed=5)
    q90_422 = encode(32, 32, quality=90, subsampling=1, seed=6)
    q90_420 = encode(32, 32, quality=90, subsampling=2, seed=7)
    progressive = encode(40, 30, quality=80, subsampling=2, progressive=True, seed=8)
    q75_420 = encode(37, 23, quality=75, subsampling=2)
    restart_blocks = encode(37, 23, quality=75, subsampling=2, restart_marker_blocks=1)
    unit_quant = encode(16, 16, quality=100, subsampling=0, qtables=[[1] * 64, [1] * 64], seed=11)
    return {
        "rgb_37x23_q75_420.jpg": encode(37, 23, quality=75, subsampling=2),
        "rgb_37x23_q95_444.jpg": encode(37, 23, quality=95, subsampling=0),
        "rgb_37x23_q75_422.jpg": encode(37, 23, quality=75, subsampling=1),
        "rgb_64x48_q95_420.jpg": encode(64, 48, quality=95, subsampling=2, seed=1),
        "rgb_17x9_q75_422.jpg": encode(17, 9, quality=75, subsampling=1, seed=2),
        "rgb_17x9_q95_420.jpg": encode(17, 9, quality=95, subsampling=2, seed=2),
        "rgb_1x1_q75_420.jpg": encode(1, 1, quality=75, subsampling=2, seed=3),
        "rgb_4x3_q75_420.jpg": encode(4, 3, quality=75, subsampling=2, seed=3),
        "rgb_5x5_q75_420.jpg": encode(5, 5, quality=75, subsampling=2, seed=3),
        "rgb_3x40_q75_422.jpg": encode(3, 40, quality=75, subsampling=1, seed=3),
        "rgb_37x23_q75_420_progressive.jpg": encode(37, 23, quality=75, subsampling=2, progressive=True),
        "rgb_64x48_q95_444_progressive.jpg": encode(64, 48, quality=95, subsampling=0, progressive=True, seed=1),
        "gray_37x23_q75.jpg": encode(37, 23, "L", quality=75, seed=4),
        "gray_17x9_q95_progressive.jpg": encode(17, 9, "L", quality=95, progressive=True, seed=4),
        "rgb_37x23_q75_420_restart_blocks.jpg": restart_blocks,
        "rgb_64x48_q75_444_restart_rows.jpg": encode(64, 48, quality=75, subsampling=0, restart_marker_rows=1, seed=1),
        "rgb_40x30_q75_420_progressive_restart.jpg": encode(
            40, 30, quality=75, subsampling=2, progressive=True, restart_marker_blocks=2, seed=9
        ),
        "rgb_37x23_q75_420_optimized.jpg": encode(37, 23, quality=75, subsampling=2, optimize=True),
        "rgb_23x17_qtables_16bit.jpg": encode(
            23, 17, subsampling=0, qtables=[[1] * 8 + [300] * 56, [2] * 8 + [400] * 56], seed=10
        ),
        "rgb_37x23_q75_420_no_dht.jpg": without(encode(37, 23, quality=75, subsampling=2), 0xC4),
        "gray_17x9_q75_no_dht.jpg": without(encode(17, 9, "L", quality=75, seed=4), 0xC4),
        "adobe_rgb_24x16_q95_444.jpg": with_adobe_rgb(q95_444),
        "rgb_ids_24x16_q95_444.jpg": with_rgb_ids(q95_444),
        "h1v2_29x27_q90.jpg": with_sampling(q90_422, 0x12, 29, 27),
        "h4v1_30x29_q90.jpg": with_sampling(q90_420, 0x41, 30, 29),
        "fill_bytes_40x30_q80_progressive.jpg": with_fill_bytes(progressive),
        "progressive_first_5_scans_40x30.jpg": without_last_scans(progressive, 5),
        "multiscan_37x23_q75_420.jpg": jpegtran(q75_420, "0: 0 63 0 0; 1: 0 63 0 0; 2: 0 63 0 0;"),
        "multiscan_restart_37x23_q75_420.jpg": jpegtran(q75_420, "0: 0 63 0 0; 1 2: 0 63 0 0;", "-restart", "3B"),
        "progressive_dc_refined_twice_37x23.jpg": jpegtran(
            q75_420,
            "0 1 2: 0 0 0 2; 0: 1 9 0 0; 0: 10 63 0 1; 2: 1 63 0 0; 1: 1 63 0 0; 0 1 2: 0 0 2 1;"
            " 0: 10 63 1 0; 0 1 2: 0 0 1 0;",
        ),
        "arithmetic_37x23_q75_420.jpg": jpegtran(q75_420, "0 1 2: 0 63 0 0;", "-arithmetic"),
        "corrupt_short_scan_37x23.jpg": corrupted(q75_420, "short"),
        "corrupt_all_ones_37x23.jpg": corrupted(q75_420, "all_ones"),
        "corrupt_noise_37x23.jpg": corrupted(q75_420, "noise", seed=1),
        "corrupt_noise_64x48_444.jpg": corrupted(encode(64, 48, quality=90, subsampling=0, seed=1), "noise", seed=2),
        "corrupt_rst_next_37x23.jpg": corrupted(restart_blocks, "rst1"),
        "corrupt_rst_far_37x23.jpg": corrupted(restart_blocks, "rst4"),
        "corrupt_rst_previous_37x23.jpg": corrupted(restart_blocks, "rst7"),
        "corrupt_rst_missing_37x23.jpg": corrupted(restart_blocks, "rst_missing"),
        "corrupt_progressive_short_40x30.jpg": progressive[: len(progressive) - 60] + b"\xff\xd9",
        "corrupt_progressive_noise_40x30.jpg": corrupted(progressive, "noise", seed=3),
        "huge_coefficients_q5.jpg": with_flat_quant(unit_quant, 5),
        "huge_coefficients_q40.jpg": with_flat_quant(unit_quant, 40),
        "huge_coefficients_q255.jpg": with_flat_quant(unit_quant, 255),
        "huge_coefficients_q40000.jpg": with_flat_quant(unit_quant, 40000),
    }


OUTCOMES = {"arithmetic_37x23_q75_420.jpg": "refused"}


def main():
    assert PIL.__version__ == "13.0.0", PIL.__version__
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for name, data in cases().items():
        (OUT / name).write_bytes(data)
        with Image.open(OUT / name) as image:
            rgb = np.asarray(image.convert("RGB"))
            mode = image.mode
        height, width, _ = rgb.shape
        points = [(0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1), (width // 2, height // 2)]
        results.append(
            {
                "file": name,
                "width": width,
                "height": height,
                "pil_mode": mode,
                "outcome": OUTCOMES.get(name, "exact"),
                "rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
                "samples": [[x, y, rgb[y, x].tolist()] for x, y in points],
            }
        )
        print(f"{name}: {len(data)} bytes, {width}x{height} {mode}")
    (OUT / "cases.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
