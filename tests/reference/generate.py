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
from pathlib import Path

import numpy as np
import PIL
import PIL.features
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, LlavaNextProcessor
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

SECTIONS = {
    "tokenizers": tokenizer_cases,
    "chat": chat_cases,
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
