"""Writes Pillow's RGB decode of each JPEG test image as a PNG (tests/fixtures/decoded/<stem>.png).

The model parity tests feed these lossless copies, which keeps them independent of the JPEG decoder;
crates/image decodes the JPEGs to the same bytes (checked by crates/image/tests/jpeg.rs).
Run with the pinned environment: python tests/reference/decode_jpegs.py
"""
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT.parent / "shared" / "testdata" / "images"
OUT = ROOT / "tests" / "fixtures" / "decoded"

OUT.mkdir(parents=True, exist_ok=True)
for path in sorted(IMAGES.glob("*.jpg")):
    Image.open(path).convert("RGB").save(OUT / f"{path.stem}.png", optimize=True)
    print(OUT / f"{path.stem}.png")
