"""Parity reference generator for the LLaVA-NeXT runtime.

Writes tests/fixtures/ from transformers (PIL image backend, torch CPU, float32) so that the Rust
tests never need Python. Deterministic: re-running rewrites byte-identical files.

    python tests/reference/generate.py                 # everything
    python tests/reference/generate.py --only chat     # one or more of: tokenizers chat preprocess models
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TESTDATA = REPO.parent / "shared" / "testdata"
IMAGES = TESTDATA / "images"
TOKENIZERS = TESTDATA / "tokenizers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_NAMES = ("llama2-vicuna", "mistral")

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "PIL": "13.0.0", "numpy": "2.4.6"}

# The real LLaVA-1.6 preprocessor / processor settings (llava-hf/llava-v1.6-*-hf).
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_PROCESSOR_KWARGS = dict(
    size={"shortest_edge": 336},
    crop_size={"height": 336, "width": 336},
    image_grid_pinpoints=GRID_PINPOINTS,
    do_resize=True,
    do_center_crop=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    do_convert_rgb=True,
    do_pad=True,
    resample=3,  # BICUBIC
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
PROCESSOR_KWARGS = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
IMAGE_TOKEN_ID = 32000


def check_environment():
    if importlib.util.find_spec("torchvision") is not None:
        sys.exit("torchvision is importable: transformers would use its image backend; uninstall it")
    found = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "PIL": PIL.__version__,
        "numpy": np.__version__,
    }
    if found != PINNED:
        sys.exit(f"versions differ from tests/reference/requirements.txt: {found} != {PINNED}")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def load_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def build_processor(tokenizer_name: str) -> LlavaNextProcessor:
    tokenizer = load_tokenizer(tokenizer_name)
    image_processor = LlavaNextImageProcessorPil(**IMAGE_PROCESSOR_KWARGS)
    chat_template = (TOKENIZERS / tokenizer_name / "chat_template.jinja").read_text(encoding="utf-8")
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **PROCESSOR_KWARGS
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat-template cases
# ---------------------------------------------------------------------------------------------

TOKENIZER_TEXTS = [
    ("Hello world", True),
    ("Hello world", False),
    ("What is shown in this image?", True),
    ("The quick brown fox jumps over the lazy dog. 1234567890!", True),
    ("请描述这张图片中的内容。", True),
    ("中文 and English mixed: 火箭发射", True),
    ("Emoji 🚀🔥👍🏽 and 👨‍👩‍👧 family", True),
    (" leading space", True),
    ("trailing space ", True),
    ("  two  spaces  inside   and three", True),
    ("    ", True),
    ("line one\nline two\n\nline four\n", True),
    ("\ttab\tseparated\r\nwindows line", True),
    ("<image>\nWhat is in the picture?", True),
    ("text before <image> text after", True),
    ("<image><image>two images", False),
    ("USER: <image>\nWhat is shown in this image? ASSISTANT:", True),
    ("[INST] <image>\nWhat is shown in this image? [/INST]", True),
    (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nDescribe it. ASSISTANT:",
        True,
    ),
    ("Ünïcödé àccents, ß, naïve café; Ελληνικά; русский", True),
    ("code: fn main() { println!(\"{}\", 1 + 2); }", True),
    ("", True),
    ("</s> literal special tokens <s> in text", False),
]


def tokenizer_cases():
    cases = []
    for name in TOKENIZER_NAMES:
        tokenizer = load_tokenizer(name)
        for text, add_special in TOKENIZER_TEXTS:
            ids = tokenizer(text, add_special_tokens=add_special).input_ids
            cases.append(
                {
                    "tokenizer": name,
                    "text": text,
                    "add_special_tokens": add_special,
                    "ids": ids,
                    "decoded": tokenizer.decode(ids, skip_special_tokens=True),
                }
            )
    write_json(FIXTURES / "tokenizer_cases.json", cases)
    print(f"tokenizer_cases.json: {len(cases)} cases")


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}

CHAT_MESSAGES = [
    ("single image question", [{"role": "user", "content": [IMAGE, text("What is shown in this image?")]}], True),
    ("no generation prompt", [{"role": "user", "content": [IMAGE, text("What is shown in this image?")]}], False),
    ("text only", [{"role": "user", "content": [text("Tell me a joke.")]}], True),
    ("text before image in content list", [{"role": "user", "content": [text("Describe:"), IMAGE]}], True),
    ("two images", [{"role": "user", "content": [IMAGE, IMAGE, text("Compare the two pictures.")]}], True),
    ("chinese", [{"role": "user", "content": [IMAGE, text("这张图片里有什么？")]}], True),
    (
        "multi-turn",
        [
            {"role": "user", "content": [IMAGE, text("What is shown in this image?")]},
            {"role": "assistant", "content": [text("A rocket on a launch pad.")]},
            {"role": "user", "content": [text("What color is it?")]},
        ],
        True,
    ),
]
SYSTEM_MESSAGE = {
    "role": "system",
    "content": [text("A chat between a curious human and an artificial intelligence assistant.")],
}
VICUNA_ONLY_MESSAGES = [
    (
        "system + image question",
        [SYSTEM_MESSAGE, {"role": "user", "content": [IMAGE, text("What is shown in this image?")]}],
        True,
    ),
]


def chat_cases():
    cases = []
    for name in TOKENIZER_NAMES:
        processor = build_processor(name)
        # The mistral template raises on a system role, so system prompts are vicuna-only.
        extra = VICUNA_ONLY_MESSAGES if name == "llama2-vicuna" else []
        for label, messages, add_generation_prompt in CHAT_MESSAGES + extra:
            rendered = processor.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            cases.append(
                {
                    "tokenizer": name,
                    "label": label,
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "rendered": rendered,
                }
            )
    write_json(FIXTURES / "chat_cases.json", cases)
    print(f"chat_cases.json: {len(cases)} cases")


# ---------------------------------------------------------------------------------------------
# Image preprocessing cases
# ---------------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, mode: str) -> Image.Image:
    """The documented integer pattern; x is the column, y the row."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (7 * x + 13 * y) % 256
    g = (x * y + 3 * x) % 256
    b = (x ^ y) % 256
    alpha = (5 * x + 11 * y) % 256
    gray = (3 * x + 5 * y) % 256
    channels = {"RGB": [r, g, b], "RGBA": [r, g, b, alpha], "L": [gray], "LA": [gray, alpha]}[mode]
    array = np.stack(channels, axis=-1).astype(np.uint8)
    return Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)


SYNTHETIC_RGB_SIZES = [
    (1, 1), (1, 2000), (2000, 1), (2, 3), (3, 2), (335, 337), (337, 335), (336, 336), (672, 672),
    (100, 100), (800, 600), (600, 800), (1000, 1000), (336, 1008), (1008, 336), (13, 1000), (1000, 13),
    (4000, 3000), (336, 672), (672, 336), (1008, 1008), (640, 427), (427, 640), (1920, 1080),
    (1080, 1920), (500, 250), (250, 500), (1009, 337), (337, 1009), (671, 673),
]  # (width, height)
SYNTHETIC_SPREAD_COUNT = 30
SYNTHETIC_OTHER_MODES = [
    ("RGBA", 800, 600), ("RGBA", 37, 53), ("RGBA", 336, 336),
    ("L", 800, 600), ("L", 501, 333),
    ("LA", 640, 480), ("LA", 31, 17),
]
SAMPLES_PER_CASE = 32


def synthetic_spread_sizes():
    """Fixed-seed sizes not in SYNTHETIC_RGB_SIZES: half log-uniform in 1..2500, half uniform in 100..2500."""
    rng = np.random.default_rng(20240601)
    sizes = []
    while len(sizes) < SYNTHETIC_SPREAD_COUNT:
        if len(sizes) % 2 == 0:
            width, height = (max(1, int(np.exp(v))) for v in rng.uniform(0.0, np.log(2500.0), size=2))
        else:
            width, height = (int(v) for v in rng.integers(100, 2501, size=2))
        if (width, height) not in SYNTHETIC_RGB_SIZES and (width, height) not in sizes:
            sizes.append((width, height))
    return sizes


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def preprocess_case(processor, name, source, image: Image.Image):
    width, height = image.size
    rgb = processor.image_processor.convert_to_rgb(image)  # what process_image() builds from a PIL image
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    best_h, best_w = select_best_resolution((height, width), GRID_PINPOINTS)
    inputs = processor(images=image, text="<image>", return_tensors="np")
    pixels = inputs["pixel_values"][0].astype("<f4")
    assert pixels.dtype == np.float32 and pixels.shape[1:] == (3, 336, 336)
    assert list(inputs["image_sizes"][0]) == [height, width]
    image_tokens = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    flat = pixels.reshape(-1)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    indices = np.sort(rng.choice(flat.size, size=SAMPLES_PER_CASE, replace=False))
    return {
        "name": name,
        "source": source,
        "mode": image.mode,
        "width": width,
        "height": height,
        "rgb_sha256": sha256(rgb),
        "best_resolution": [int(best_h), int(best_w)],
        "grid": [int(best_h) // 336, int(best_w) // 336],
        "num_patches": int(pixels.shape[0]),
        "image_tokens": image_tokens,
        "pixels_shape": list(pixels.shape),
        "pixels_sha256": sha256(pixels),
        "samples": [[int(i), float(flat[i])] for i in indices],
    }


def preprocess_cases():
    processor = build_processor("llama2-vicuna")
    cases = []
    for path in sorted(IMAGES.iterdir()):
        with Image.open(path) as image:
            image.load()
            cases.append(preprocess_case(processor, path.name, f"file:{path.name}", image))
    rgb_sizes = SYNTHETIC_RGB_SIZES + synthetic_spread_sizes()
    for mode, width, height in [("RGB", w, h) for w, h in rgb_sizes] + SYNTHETIC_OTHER_MODES:
        name = f"synthetic_{mode}_{width}x{height}"
        cases.append(preprocess_case(processor, name, "synthetic", synthetic_image(width, height, mode)))
    names = [case["name"] for case in cases]
    assert len(names) == len(set(names)), "duplicate preprocess case names"
    write_json(FIXTURES / "preprocess.json", cases)
    print(f"preprocess.json: {len(cases)} cases")


# ---------------------------------------------------------------------------------------------

SECTIONS = {
    "tokenizers": tokenizer_cases,
    "chat": chat_cases,
    "preprocess": preprocess_cases,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="generate only these sections")
    args = parser.parse_args()
    check_environment()
    for name, section in SECTIONS.items():
        if args.only is None or name in args.only:
            section()


if __name__ == "__main__":
    main()
