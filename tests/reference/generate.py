"""Parity reference generator for the LLaVA-NeXT runtime.

Writes tests/fixtures/ from transformers (PIL image backend, torch CPU, float32) so that the Rust
tests never need Python. Deterministic: re-running rewrites byte-identical files.

    python tests/reference/generate.py                 # everything
    python tests/reference/generate.py --only chat     # one or more of: tokenizers chat preprocess models odd_heads gelu_tower liuhaotian chatml quant
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
from safetensors.torch import load_file, save_file
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    MistralConfig,
)
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


def to_json(value, indent="") -> str:
    """Indented JSON whose lists of scalars (ids, samples, shapes) stay on one line."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        if all(isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v) for v in value):
            return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in value) + "]"
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert json.loads(to_json(value)) == value
    path.write_text(to_json(value) + "\n", encoding="utf-8")


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
# Tiny random checkpoints with the real LLaVA-1.6 geometry, and their expected outputs
# ---------------------------------------------------------------------------------------------

VISION_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=336,
    patch_size=14, projection_dim=32,
)
TEXT_COMMON = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, num_hidden_layers=2)
GREEDY_STEPS = 16
MARGIN_FRACTION = 1e-3  # min (top1 - top2) over greedy steps must be >= this * max|logit|
MIN_DISTINCT_TOKENS = 4  # reject seeds whose greedy output is a single repeated token or so
TEXT_INITIALIZER_RANGE = 0.4  # large enough for sharp attention, varied greedy text and clear argmax gaps
FIRST_SEED = 1000
MAX_SEED_TRIES = 50

ROCKET_QUESTION = "What is shown in this image?"
CHINESE_QUESTION = "这张图片里有什么？请详细描述。"
TEXT_ONLY_QUESTION = "Write a short poem about the sea."
FOLLOW_UP_QUESTION = "Can you say more about the colors?"

MODELS = {
    "vicuna-tiny": dict(
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=4, rope_theta=1e4),
        tokenizer="llama2-vicuna", dtype=torch.float16, layout="transformers5", tie=False,
        cases=[
            ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
            ("chelsea_zh", "chelsea.png", CHINESE_QUESTION),
            ("text_only", None, TEXT_ONLY_QUESTION),
        ],
        multi_turn=("grace_hopper.jpg", "Who is this person?", FOLLOW_UP_QUESTION),
    ),
    "mistral-tiny": dict(
        text=dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1e6, sliding_window=4096),
        tokenizer="mistral", dtype=torch.float16, layout="hub4x", tie=False,
        cases=[
            ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
            ("logo_rgba_zh", "logo.png", CHINESE_QUESTION),
            ("text_only", None, TEXT_ONLY_QUESTION),
        ],
        multi_turn=("page.png", "What does this page say?", FOLLOW_UP_QUESTION),
    ),
    "tied-f32": dict(
        text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2, rope_theta=1e4),
        tokenizer="llama2-vicuna", dtype=torch.float32, layout="transformers5", tie=True,
        cases=[
            ("astronaut_en", "astronaut.png", ROCKET_QUESTION),
            ("text_only", None, TEXT_ONLY_QUESTION),
        ],
        multi_turn=None,
    ),
    "bf16-tiny": dict(
        text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2, rope_theta=1e4),
        tokenizer="llama2-vicuna", dtype=torch.bfloat16, layout="transformers5", tie=False,
        cases=[
            ("coffee_en", "coffee.png", "What is in the cup?"),
        ],
        multi_turn=None,
    ),
}
# Head dims off the usual powers of two (vision 24 / 2 = 12, text 40 / 2 = 20, GQA 2/1), written by
# their own section so that the models above are not regenerated.
ODD_HEAD_MODELS = {
    "odd-heads-tiny": dict(
        vision=dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, projection_dim=24),
        text=dict(model_type="llama", hidden_size=40, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, rope_theta=1e4),
        tokenizer="llama2-vicuna", dtype=torch.float16, layout="transformers5", tie=True,
        cases=[
            ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
            ("text_only", None, TEXT_ONLY_QUESTION),
        ],
        multi_turn=None,
    ),
}
# A CLIP tower with exact GELU (LAION's CLIP towers use it) instead of OpenAI CLIP's quick_gelu,
# written by its own section as well.
GELU_TOWER_MODELS = {
    "gelu-tower-tiny": dict(
        vision=dict(hidden_act="gelu"),
        text=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2, rope_theta=1e4),
        tokenizer="llama2-vicuna", dtype=torch.float16, layout="transformers5", tie=True,
        cases=[
            ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
        ],
        multi_turn=None,
    ),
}
# Files larger than this are symlinked to the first model folder that holds the same tokenizer.
SHARED_TOKENIZER_FILE = "tokenizer.json"
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def make_config(spec) -> LlavaNextConfig:
    text = dict(TEXT_COMMON, **spec["text"])
    model_type = text.pop("model_type")
    text_config_class = {"llama": LlamaConfig, "mistral": MistralConfig}[model_type]
    text_config = text_config_class(**text, tie_word_embeddings=spec["tie"],
                                    initializer_range=TEXT_INITIALIZER_RANGE)
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**dict(VISION_CONFIG, **spec.get("vision", {}))),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=spec["tie"],
    )


def hub_tensor_name(name: str) -> str:
    """transformers in-memory name -> llava-hf hub checkpoint name."""
    for prefix, hub_prefix in (
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(prefix):
            return hub_prefix + name[len(prefix):]
    if name == "model.image_newline":
        return "image_newline"
    raise ValueError(f"unexpected tensor {name}")


def hub_config_json(config: LlavaNextConfig, spec) -> dict:
    """A transformers-4.x style config.json that, like the real hub files, stores mostly non-defaults."""
    text = config.text_config
    dtype = DTYPE_NAMES[spec["dtype"]]
    text_json = {
        "_name_or_path": "tiny-random-mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "model_type": "mistral",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "sliding_window": text.sliding_window,
        "torch_dtype": dtype,
        "vocab_size": text.vocab_size,
    }
    vision = config.vision_config
    vision_json = {
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_size": vision.intermediate_size,
        "model_type": "clip_vision_model",
        "num_attention_heads": vision.num_attention_heads,
        "num_hidden_layers": vision.num_hidden_layers,
        "patch_size": vision.patch_size,
        "projection_dim": vision.projection_dim,
        "vocab_size": 32000,
    }
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": GRID_PINPOINTS,
        "image_token_index": IMAGE_TOKEN_ID,
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": text_json,
        "torch_dtype": dtype,
        "transformers_version": "4.39.0.dev0",
        "use_image_newline_parameter": True,
        "vision_config": vision_json,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": text.vocab_size,
    }


HUB_SHARDS = (
    ("vision_tower.", "multi_modal_projector.", "image_newline"),
    ("language_model.model.",),
    ("language_model.lm_head.",),
)


def write_hub_layout(model, config, spec, folder: Path):
    tensors = {hub_tensor_name(k): v.detach().to(spec["dtype"]).contiguous() for k, v in model.state_dict().items()}
    shard_names = [f"model-{i + 1:05d}-of-{len(HUB_SHARDS):05d}.safetensors" for i in range(len(HUB_SHARDS))]
    weight_map = {}
    for shard_name, prefixes in zip(shard_names, HUB_SHARDS):
        shard = {k: v for k, v in sorted(tensors.items()) if k.startswith(prefixes)}
        save_file(shard, folder / shard_name, metadata={"format": "pt"})
        weight_map.update({k: shard_name for k in shard})
    assert sorted(weight_map) == sorted(tensors), "a tensor is in no shard"
    total_size = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(folder / "config.json", hub_config_json(config, spec))
    write_json(folder / "generation_config.json",
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                "transformers_version": "4.39.0.dev0"})
    # 4.x processors: a flat preprocessor_config.json next to processor_config.json.
    preprocessor = dict(sorted(IMAGE_PROCESSOR_KWARGS.items()))
    preprocessor.update(aspect_ratio_setting="anyres", image_processor_type="LlavaNextImageProcessor",
                        processor_class="LlavaNextProcessor")
    write_json(folder / "preprocessor_config.json", dict(sorted(preprocessor.items())))
    write_json(folder / "processor_config.json",
               {"image_token": "<image>", "processor_class": "LlavaNextProcessor", **PROCESSOR_KWARGS})


def write_tokenizer_files(spec, folder: Path, tokenizer_homes: dict):
    for file_name in TOKENIZER_FILES:
        target = folder / file_name
        target.unlink(missing_ok=True)
        home = tokenizer_homes.get(spec["tokenizer"])
        source = TOKENIZERS / spec["tokenizer"] / file_name
        if file_name == SHARED_TOKENIZER_FILE and home is not None:
            target.symlink_to(Path("..") / home / file_name)  # saves ~1.4 MB per extra copy
        elif file_name == SHARED_TOKENIZER_FILE:
            # Minified: the same JSON in 40 % of the bytes, to keep the fixtures small.
            tokenizer = json.loads(source.read_text(encoding="utf-8"))
            target.write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        else:
            shutil.copyfile(source, target)
    tokenizer_homes.setdefault(spec["tokenizer"], folder.name)


def write_checkpoint(name, spec, seed, tokenizer_homes) -> LlavaNextForConditionalGeneration:
    folder = FIXTURES / "models" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = make_config(spec)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    if spec["layout"] == "hub4x":
        write_hub_layout(model, config, spec, folder)
    else:
        model.to(spec["dtype"]).save_pretrained(folder)
        build_processor(spec["tokenizer"]).save_pretrained(folder)
    write_tokenizer_files(spec, folder, tokenizer_homes)
    return model


def load_checkpoint(name, spec, written):
    """Load the saved folder exactly as a user would, in float32, and check nothing was re-initialised."""
    folder = FIXTURES / "models" / name
    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor.image_processor, LlavaNextImageProcessorPil)
    loaded = model.state_dict()
    for key, value in written.state_dict().items():
        expected = value.detach().to(spec["dtype"]).to(torch.float32)
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], expected), f"{name}: {key} differs"
    text = model.config.text_config
    assert text.rope_parameters["rope_theta"] == spec["text"]["rope_theta"]
    assert text.num_key_value_heads == spec["text"]["num_key_value_heads"]
    assert text.rms_norm_eps == 1e-5
    assert model.config.vision_config.hidden_act == spec.get("vision", {}).get("hidden_act", "quick_gelu")
    if spec["tie"]:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    return model, processor


def chat_prompt(processor, turns, image_first: bool):
    """turns: alternating user/assistant texts; the first user turn carries the image when image_first."""
    messages = []
    for index, turn in enumerate(turns):
        role = "user" if index % 2 == 0 else "assistant"
        content = [IMAGE] if (index == 0 and image_first) else []
        messages.append({"role": role, "content": content + [text(turn)]})
    add_generation_prompt = len(turns) % 2 == 1
    return messages, processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                   tokenize=False)


def model_inputs(processor, prompt, image_name):
    if image_name is None:
        return processor(text=prompt, return_tensors="pt")
    with Image.open(IMAGES / image_name) as image:
        image.load()
        return processor(images=image, text=prompt, return_tensors="pt")


@torch.no_grad()
def greedy(model, inputs):
    """16 argmax steps with transformers' KV cache and no eos stop, then checked by one full recompute."""
    prompt_ids = inputs["input_ids"]
    images = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
    out = model(input_ids=prompt_ids, **images, use_cache=True, logits_to_keep=1)
    step_logits = [out.logits[0, -1]]
    tokens = [int(step_logits[-1].argmax())]
    while len(tokens) < GREEDY_STEPS:
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
        step_logits.append(out.logits[0, -1])
        tokens.append(int(step_logits[-1].argmax()))
    cached = torch.stack(step_logits).float()
    # Without cache: the whole prompt + 15 generated tokens in one forward gives the same 16 argmaxes.
    full_ids = torch.cat([prompt_ids, torch.tensor([tokens[:-1]])], dim=1)
    full = model(input_ids=full_ids, **images, logits_to_keep=GREEDY_STEPS).logits[0].float()
    assert full.argmax(-1).tolist() == tokens, "cached and uncached greedy disagree"
    assert torch.allclose(full, cached, rtol=0, atol=1e-4 * float(full.abs().max()))
    # transformers' own greedy generate (stops at eos) must agree on its prefix.
    generated = model.generate(**inputs, max_new_tokens=GREEDY_STEPS, do_sample=False)[0, prompt_ids.shape[1]:]
    assert generated.tolist() == tokens[: len(generated)], f"generate() disagrees: {generated.tolist()} vs {tokens}"
    margins = [float(top[0] - top[1]) for logits in (full, cached) for top in torch.topk(logits, 2).values]
    max_abs = max(float(full.abs().max()), float(cached.abs().max()))
    prompt_logits = cached[0].numpy().astype("<f4")
    return tokens, prompt_logits, min(margins), max_abs


class MarginTooSmall(Exception):
    """This seed gives near-tied or degenerate greedy runs; try the next one."""


MARGIN_RULE = (f"every greedy run: min_margin >= {MARGIN_FRACTION} * max|logit| over its steps,"
               f" every greedy token < 32000, >= {MIN_DISTINCT_TOKENS} distinct tokens")


def check_margins(tokens, min_margin, max_abs):
    """MARGIN_RULE, or MarginTooSmall."""
    if min_margin < MARGIN_FRACTION * max_abs:
        raise MarginTooSmall(f"min_margin {min_margin:.3g} < {MARGIN_FRACTION} * {max_abs:.3g}")
    if max(tokens) >= IMAGE_TOKEN_ID:
        raise MarginTooSmall(f"greedy produced a non-text token id {max(tokens)}")
    if len(set(tokens)) < MIN_DISTINCT_TOKENS:
        raise MarginTooSmall(f"greedy repeats: only {len(set(tokens))} distinct tokens")


def first_clear_seed(name, attempt):
    """attempt(seed) for seeds from FIRST_SEED on until one does not raise MarginTooSmall:
    (seed, the rejected seeds with their reasons, attempt's result)."""
    rejected = []
    for seed in range(FIRST_SEED, FIRST_SEED + MAX_SEED_TRIES):
        try:
            return seed, rejected, attempt(seed)
        except MarginTooSmall as reason:
            print(f"{name}: seed {seed} rejected: {reason}")
            rejected.append({"seed": seed, "reason": str(reason)})
    sys.exit(f"{name}: no seed in {MAX_SEED_TRIES} tries gives clear greedy margins")


def write_expected(name, header, seed, rejected, cases, arrays):
    """expected/<name>.json (the model, `header`'s keys, the seed search and the cases) and its
    arrays, replacing the model's old files."""
    expected_dir = FIXTURES / "expected"
    expected_dir.mkdir(parents=True, exist_ok=True)
    for stale in expected_dir.glob(f"{name}.*"):
        stale.unlink()
    for file_name, array in arrays.items():
        np.save(expected_dir / file_name, array)
    write_json(expected_dir / f"{name}.json", {
        "model": name, "checkpoint": f"models/{name}", **header, "seed": seed, "rejected_seeds": rejected,
        "margin_rule": MARGIN_RULE, "greedy_steps": GREEDY_STEPS, "cases": cases,
    })
    print(f"{name}: seed {seed}, {len(cases)} cases, margins "
          + ", ".join(f"{c['min_margin'] / c['max_abs_logit_over_steps']:.3g}" for c in cases))


def run_greedy_case(model, processor, prompt, image_name):
    inputs = model_inputs(processor, prompt, image_name)
    tokens, prompt_logits, min_margin, max_abs = greedy(model, inputs)
    check_margins(tokens, min_margin, max_abs)
    input_ids = inputs["input_ids"][0]
    result = {
        "prompt": prompt,
        "input_ids": input_ids.tolist(),
        "image_tokens": int((input_ids == IMAGE_TOKEN_ID).sum()),
        "max_abs_logit": float(np.abs(prompt_logits).max()),
        "greedy_tokens": tokens,
        "greedy_text": processor.tokenizer.decode(tokens, skip_special_tokens=True),
        "min_margin": min_margin,
        "max_abs_logit_over_steps": max_abs,
    }
    return result, inputs, prompt_logits


@torch.no_grad()
def feature_arrays(model, inputs):
    """Layer -2 vision features without CLS, and the packed projector output merged into the embeddings."""
    pixel_values = inputs["pixel_values"][0]
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    vision_features = hidden[-2][:, 1:].float().numpy().astype("<f4")
    packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    image_features = torch.cat(list(packed), dim=0).float().numpy().astype("<f4")
    # The projector of the overview's features is the first 576 rows (base first).
    projected_base = model.model.multi_modal_projector(torch.from_numpy(vision_features[:1]))[0].numpy()
    assert np.array_equal(projected_base, image_features[:576])
    assert image_features.shape[0] == int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    return vision_features, image_features


def expected_for_model(name, spec, model, processor):
    """All cases of one model; raises MarginTooSmall when this seed gives near-ties."""
    cases, arrays = [], {}
    for index, (case_id, image_name, question) in enumerate(spec["cases"]):
        messages, prompt = chat_prompt(processor, [question], image_first=image_name is not None)
        result, inputs, logits = run_greedy_case(model, processor, prompt, image_name)
        case = {"id": case_id, "image": image_name, "question": question, "messages": messages, **result}
        case["logits_npy"] = f"{name}.{case_id}.logits.npy"
        arrays[case["logits_npy"]] = logits
        if index == 0:
            vision_features, image_features = feature_arrays(model, inputs)
            case["vision_features_npy"] = f"{name}.{case_id}.vision_features.npy"
            case["image_features_npy"] = f"{name}.{case_id}.image_features.npy"
            arrays[case["vision_features_npy"]] = vision_features
            arrays[case["image_features_npy"]] = image_features
        cases.append(case)
    if spec["multi_turn"] is not None:
        image_name, first_question, follow_up = spec["multi_turn"]
        _, first_prompt = chat_prompt(processor, [first_question], image_first=True)
        first, _, first_logits = run_greedy_case(model, processor, first_prompt, image_name)
        answer = first["greedy_text"].strip()
        messages, prompt = chat_prompt(processor, [first_question, answer, follow_up], image_first=True)
        second, _, logits = run_greedy_case(model, processor, prompt, image_name)
        case_id = "multi_turn"
        case = {"id": case_id, "image": image_name, "question": follow_up, "messages": messages, **second}
        case["logits_npy"] = f"{name}.{case_id}.logits.npy"
        case["turn1"] = dict(first, question=first_question, assistant_text=answer,
                             logits_npy=f"{name}.{case_id}.turn1.logits.npy")
        arrays[case["logits_npy"]] = logits
        arrays[case["turn1"]["logits_npy"]] = first_logits
        cases.append(case)
    return cases, arrays


def models_and_expected(models=MODELS, tokenizer_homes=None):
    tokenizer_homes = {} if tokenizer_homes is None else tokenizer_homes
    for name, spec in models.items():
        def attempt(seed):
            homes = dict(tokenizer_homes)
            written = write_checkpoint(name, spec, seed, homes)
            model, processor = load_checkpoint(name, spec, written)
            return expected_for_model(name, spec, model, processor), homes

        seed, rejected, ((cases, arrays), tokenizer_homes) = first_clear_seed(name, attempt)
        header = {"stored_dtype": DTYPE_NAMES[spec["dtype"]], "layout": spec["layout"]}
        write_expected(name, header, seed, rejected, cases, arrays)


def odd_head_models():
    """ODD_HEAD_MODELS, as `models` writes its own; tokenizer.json links to vicuna-tiny's copy."""
    models_and_expected(ODD_HEAD_MODELS, {"llama2-vicuna": "vicuna-tiny"})


def gelu_tower_models():
    """GELU_TOWER_MODELS, as `odd_heads` writes its own."""
    models_and_expected(GELU_TOWER_MODELS, {"llama2-vicuna": "vicuna-tiny"})


# ---------------------------------------------------------------------------------------------
# The original LLaVA layout (liuhaotian/llava-v1.6-*), checked against an equivalent llava-hf model
# ---------------------------------------------------------------------------------------------

LIUHAOTIAN = "liuhaotian-tiny"
# LLaVA's IMAGE_TOKEN_INDEX (llava/constants.py): the id tokenizer_image_token puts where "<image>" was.
LLAVA_IMAGE_TOKEN_INDEX = -200
LIUHAOTIAN_TEXT = dict(vocab_size=32000, hidden_size=16, intermediate_size=32, num_attention_heads=1,
                       num_key_value_heads=1, num_hidden_layers=2, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_theta=1e4)
# The folder mm_vision_tower names, relative to the model folder (LLaVA's CLIPVisionModel.from_pretrained
# takes a local folder as well as a hub name).
LIUHAOTIAN_TOWER = "clip-vit-tiny-patch14-336"
LIUHAOTIAN_CASES = [
    ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
    ("chelsea_zh", "chelsea.png", CHINESE_QUESTION),
    ("text_only", None, TEXT_ONLY_QUESTION),
]
# LLaVA's conv_llava_v1 / conv_vicuna_v1 (llava/conversation.py, SeparatorStyle.TWO), which its run
# scripts pick for llava-v1.6-vicuna-* and SGLang's vicuna_v1.1 template reproduces.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def llava_v1_prompt(question, with_image):
    """conv_llava_v1.get_prompt() for one user turn ("<image>\n" + question) and an open assistant turn."""
    message = ("<image>\n" + question) if with_image else question
    return f"{LLAVA_V1_SYSTEM} USER: {message} ASSISTANT:"


def tokenizer_image_token(prompt, tokenizer):
    """llava/mm_utils.py tokenizer_image_token: tokenize the chunks between "<image>" separately, keep
    the first chunk's BOS once, drop the later chunks' BOS, put IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [piece for chunk in chunks for piece in (chunk, [LLAVA_IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
    for piece in separated:
        input_ids.extend(piece[offset:])
    return input_ids


def liuhaotian_tensor_name(name: str) -> str:
    """transformers in-memory name -> original LLaVA checkpoint name."""
    for prefix, llava_prefix in (
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.language_model.", "model."),
        ("model.image_newline", "model.image_newline"),
        ("lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            return llava_prefix + name[len(prefix):]
    raise ValueError(f"unexpected tensor {name}")


def liuhaotian_config_json(vision: dict) -> dict:
    """Shaped like liuhaotian/llava-v1.6-vicuna-7b/config.json, with the tiny sizes."""
    text = LIUHAOTIAN_TEXT
    return {
        "_name_or_path": "./checkpoints/tiny-vicuna",
        "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": 224,
        "image_grid_pinpoints": GRID_PINPOINTS,
        "image_split_resolution": 224,
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "mm_hidden_size": vision["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": 2e-05,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": LIUHAOTIAN_TOWER,
        "mm_vision_tower_lr": 2e-06,
        "model_type": "llava_llama",
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": text["rope_theta"],
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float16",
        "transformers_version": "4.36.2",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": text["vocab_size"],
    }


def write_liuhaotian_folder(folder: Path, model, dtype):
    """Weights renamed to the LLaVA names, the image token's row dropped from embed_tokens and lm_head."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / LIUHAOTIAN_TOWER).mkdir(parents=True)
    vocab = LIUHAOTIAN_TEXT["vocab_size"]
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.detach()
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert value.shape[0] == vocab + 1
            value = value[:vocab]
        tensors[liuhaotian_tensor_name(name)] = value.to(dtype).contiguous()
    save_file(dict(sorted(tensors.items())), folder / "model.safetensors", metadata={"format": "pt"})
    vision = dict(VISION_CONFIG, hidden_act="quick_gelu", layer_norm_eps=1e-5, model_type="clip_vision_model")
    write_json(folder / "config.json", liuhaotian_config_json(vision))
    # Like openai/clip-vit-large-patch14-336/config.json: a CLIPConfig with the vision part nested.
    write_json(folder / LIUHAOTIAN_TOWER / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": VISION_CONFIG["projection_dim"],
        "vision_config": dict(sorted(vision.items())),
    })
    write_json(folder / "generation_config.json",
               {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                "transformers_version": "4.36.2"})
    # LLaVA's vicuna tokenizer has no <image> (nor <pad>): the 32000 ids of Llama-2. Minified to keep it small.
    tokenizer = json.loads((TOKENIZERS / "llama2-vicuna" / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["id"] < vocab]
    assert [t["content"] for t in tokenizer["added_tokens"]] == ["<unk>", "<s>", "</s>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")),
                                           encoding="utf-8")
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": False, "model_max_length": 4096, "pad_token": "<unk>",
        "padding_side": "right", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    })


def liuhaotian_equivalent_model(seed):
    """A llava-hf model with the same weights plus one extra vocabulary row for its image token."""
    text = dict(LIUHAOTIAN_TEXT, vocab_size=LIUHAOTIAN_TEXT["vocab_size"] + 1)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG),
        text_config=LlamaConfig(**text, tie_word_embeddings=False, initializer_range=TEXT_INITIALIZER_RANGE),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def liuhaotian_expected(model, tokenizer, image_processor, count_processor):
    cases, arrays = [], {}
    for index, (case_id, image_name, question) in enumerate(LIUHAOTIAN_CASES):
        prompt = llava_v1_prompt(question, image_name is not None)
        llava_ids = tokenizer_image_token(prompt, tokenizer)
        inputs = {}
        image_tokens = 0
        if image_name is not None:
            with Image.open(IMAGES / image_name) as image:
                image.load()
                inputs = dict(image_processor(images=image, return_tensors="pt"))
                image_tokens = int((count_processor(images=image, text="<image>", return_tensors="pt")
                                    ["input_ids"] == IMAGE_TOKEN_ID).sum())
        assert llava_ids.count(LLAVA_IMAGE_TOKEN_INDEX) == (image_name is not None)
        expanded = []
        for token in llava_ids:
            expanded.extend([IMAGE_TOKEN_ID] * image_tokens if token == LLAVA_IMAGE_TOKEN_INDEX else [token])
        inputs = {"input_ids": torch.tensor([expanded]), **{k: inputs[k] for k in ("pixel_values", "image_sizes")
                                                             if k in inputs}}
        tokens, prompt_logits, min_margin, max_abs = greedy(model, inputs)
        check_margins(tokens, min_margin, max_abs)
        logits = prompt_logits[:IMAGE_TOKEN_ID]
        case = {
            "id": case_id, "image": image_name, "question": question, "prompt": prompt,
            "llava_input_ids": llava_ids, "input_ids": expanded, "image_tokens": image_tokens,
            "max_abs_logit": float(np.abs(logits).max()), "greedy_tokens": tokens,
            "greedy_text": tokenizer.decode(tokens, skip_special_tokens=True),
            "min_margin": min_margin, "max_abs_logit_over_steps": max_abs,
            "logits_npy": f"{LIUHAOTIAN}.{case_id}.logits.npy",
        }
        arrays[case["logits_npy"]] = logits
        if index == 0:
            _, image_features = feature_arrays(model, inputs)
            case["image_features_npy"] = f"{LIUHAOTIAN}.{case_id}.image_features.npy"
            arrays[case["image_features_npy"]] = image_features
        cases.append(case)
    return cases, arrays


def liuhaotian_fixture():
    folder = FIXTURES / "models" / LIUHAOTIAN
    image_processor = LlavaNextImageProcessorPil(**IMAGE_PROCESSOR_KWARGS)
    count_processor = build_processor("llama2-vicuna")
    dtype = torch.float16

    def attempt(seed):
        model = liuhaotian_equivalent_model(seed)
        write_liuhaotian_folder(folder, model, dtype)
        # The reference runs the stored (fp16-rounded) weights in float32. Parameters only: buffers
        # such as RoPE's inv_freq stay exact, as from_pretrained(dtype=float32) would build them.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(dtype).float())
        stored = load_file(folder / "model.safetensors")
        for name, value in model.state_dict().items():
            assert torch.equal(stored[liuhaotian_tensor_name(name)].float(), value[:IMAGE_TOKEN_ID]), name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.convert_tokens_to_ids("<image>") == tokenizer.unk_token_id, "<image> must not be a token"
        return liuhaotian_expected(model, tokenizer, image_processor, count_processor)

    seed, rejected, (cases, arrays) = first_clear_seed(LIUHAOTIAN, attempt)
    header = {"stored_dtype": DTYPE_NAMES[dtype], "layout": "liuhaotian",
              "reference": "LlavaNextForConditionalGeneration with the same weights, vocab 32001 (image token 32000)"}
    write_expected(LIUHAOTIAN, header, seed, rejected, cases, arrays)


# ---------------------------------------------------------------------------------------------
# A ChatML (llava-v1.6-34b / Yi style) tiny checkpoint
# ---------------------------------------------------------------------------------------------

CHATML = "chatml-tiny"
# There is no Yi tokenizer in ../shared/testdata/tokenizers: the llama2-vicuna one stands in, with
# <|im_start|> and <|im_end|> added as special tokens after <image> (32000) and <pad> (32001).
CHATML_TOKENS = {"<|im_start|>": 32002, "<|im_end|>": 32003}
# Spec §7's 34b prompt (LLaVA's chatml_direct), as a chat template shipped with the checkpoint.
CHATML_TEMPLATE = (
    "{% if not (messages and messages[0]['role'] == 'system') %}"
    "{{ '<|im_start|>system\\nAnswer the questions.<|im_end|>' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPEC = dict(
    # eos is <|im_end|>, as in llava-v1.6-34b's generation_config.json.
    text=dict(model_type="llama", vocab_size=32004, hidden_size=16, intermediate_size=32, num_attention_heads=1,
              num_key_value_heads=1, rope_theta=5e6, eos_token_id=CHATML_TOKENS["<|im_end|>"]),
    dtype=torch.float16, layout="transformers5", tie=False,
    cases=[
        ("rocket_en", "rocket.jpg", ROCKET_QUESTION),
        ("text_only", None, TEXT_ONLY_QUESTION),
    ],
    multi_turn=None,
)


def write_chatml_checkpoint(folder: Path, seed):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokenizer = json.loads((TOKENIZERS / "llama2-vicuna" / "tokenizer.json").read_text(encoding="utf-8"))
    for content, token_id in CHATML_TOKENS.items():
        tokenizer["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                          "rstrip": False, "normalized": False, "special": True})
    tokenizer_config = json.loads((TOKENIZERS / "llama2-vicuna" / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["eos_token"] = "<|im_end|>"

    def write_tokenizer_files():
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")),
                                               encoding="utf-8")
        write_json(folder / "tokenizer_config.json", tokenizer_config)
        (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")

    write_tokenizer_files()
    processor = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(**IMAGE_PROCESSOR_KWARGS),
                                   tokenizer=AutoTokenizer.from_pretrained(folder), chat_template=CHATML_TEMPLATE,
                                   **PROCESSOR_KWARGS)
    config = make_config(CHATML_SPEC)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.to(CHATML_SPEC["dtype"]).save_pretrained(folder)
    processor.save_pretrained(folder)
    write_tokenizer_files()  # the processor rewrote them
    eos = CHATML_TOKENS["<|im_end|>"]
    write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": eos,
                                                   "transformers_version": transformers.__version__})
    return model


def chatml_fixture():
    folder = FIXTURES / "models" / CHATML

    def attempt(seed):
        written = write_chatml_checkpoint(folder, seed)
        model, processor = load_checkpoint(CHATML, CHATML_SPEC, written)
        assert [processor.tokenizer.convert_tokens_to_ids(t) for t in CHATML_TOKENS] == list(CHATML_TOKENS.values())
        assert model.generation_config.eos_token_id == CHATML_TOKENS["<|im_end|>"]
        return expected_for_model(CHATML, CHATML_SPEC, model, processor)

    seed, rejected, (cases, arrays) = first_clear_seed(CHATML, attempt)
    # The vision features of this model add nothing the other fixtures do not check.
    arrays = {name: array for name, array in arrays.items() if not name.endswith(".vision_features.npy")}
    for case in cases:
        case.pop("vision_features_npy", None)
    header = {"stored_dtype": DTYPE_NAMES[CHATML_SPEC["dtype"]], "layout": CHATML_SPEC["layout"]}
    write_expected(CHATML, header, seed, rejected, cases, arrays)


# ---------------------------------------------------------------------------------------------
# Quantization quality: a tiny checkpoint with realistic initialization, and fake-quantized runs
# ---------------------------------------------------------------------------------------------
#
# The fixtures above use TEXT_INITIALIZER_RANGE = 0.4 in rows of 32-64: that network is chaotic
# (a 0.5 % weight perturbation moves the logits by several %), so their quantized cosines measure
# the chaos, not the quantizer. The quality gates run on QUANT_GATE_MODEL instead: transformers'
# default initialization (initializer_range 0.02, CLIP's own rules for the vision tower), wider
# rows, four layers and the real tokenizer. Its weights are not committed (fp16 would be ~40 MB):
# weights.json lists every tensor with the std transformers' initialization gives it, and both
# this script and the Rust test draw the values from the same counter-based generator below,
# bit for bit (checked through a sha256 of all values).

QUANT_GATE_MODEL = "quant-gate"
QUANT_GATE_SEED = 2024
QUANT_GATE_SPEC = dict(
    text=dict(model_type="llama", hidden_size=256, intermediate_size=768, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=1e4, num_hidden_layers=4),
    vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                image_size=336, patch_size=14, projection_dim=128),
    tokenizer="llama2-vicuna",
    cases=[("rocket_en", "rocket.jpg", ROCKET_QUESTION), ("text_only", None, TEXT_ONLY_QUESTION)],
)
# Realistic initialization gives flat logits (|logit| < 1.4), so near-ties are closer than the
# 1e-3 rule above allows; the runtime's f32 logits agree with transformers' to ~1e-6 of max|logit|,
# so 1e-4 still leaves the f32 greedy comparison a clear margin.
QUANT_GATE_MARGIN_FRACTION = 1e-4
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def splitmix64(counters: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of state `counters` (uint64, wrapping)."""
    z = counters.copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def generated_normal(name: str, seed: int, count: int) -> np.ndarray:
    """`count` approximately standard-normal f64 values for tensor `name`: value i sums the twelve
    16-bit words of SplitMix64 outputs 3i..3i+2 (state = seed ^ fnv1a64(name), + (j + 1) * gamma)
    as uniforms (k + 0.5) / 65536 and subtracts 6 (Irwin-Hall, bounded at 6 sigma). Integer sums
    and one power-of-two division: exact in any language."""
    base = np.uint64(seed ^ fnv1a64(name))
    with np.errstate(over="ignore"):
        counters = base + (np.arange(1, 3 * count + 1, dtype=np.uint64) * np.uint64(SPLITMIX_GAMMA))
        words = splitmix64(counters).reshape(count, 3)
    total = np.zeros(count, dtype=np.int64)
    for shift in (0, 16, 32, 48):
        total += ((words >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64).sum(axis=1)
    return (total + 6 - 6 * 65536).astype(np.float64) / 65536.0


def canonical_name(name: str) -> str:
    """transformers 5 in-memory name -> the runtime's canonical name."""
    for prefix, canonical in (("model.vision_tower.vision_model.", "vision_model."),
                              ("model.vision_tower.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                              ("model.language_model.", "model."), ("model.image_newline", "image_newline"),
                              ("lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return canonical + name[len(prefix):]
    raise ValueError(f"unexpected tensor {name}")


def quant_gate_config() -> LlavaNextConfig:
    spec = QUANT_GATE_SPEC
    text = dict(TEXT_COMMON, **spec["text"])
    text.pop("model_type")
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**spec["vision"]),
        text_config=LlamaConfig(**text, tie_word_embeddings=False),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def quant_gate_recipe(model) -> list:
    """Every parameter: canonical name, shape, and either a constant (norms, biases) or the std of
    transformers' initialization of it (its sample std, 3 significant digits)."""
    recipe = []
    for name, value in model.named_parameters():
        value = value.detach()
        entry = {"name": canonical_name(name), "shape": list(value.shape)}
        if bool((value == value.flatten()[0]).all()):
            entry["constant"] = float(value.flatten()[0])
        else:
            entry["std"] = float(f"{float(value.std()):.3g}")
        recipe.append(entry)
    return recipe


def recipe_tensor(entry, seed) -> np.ndarray:
    """The f16 values of one recipe entry."""
    count = int(np.prod(entry["shape"]))
    if "constant" in entry:
        values = np.full(count, entry["constant"], dtype=np.float32)
    else:
        values = (generated_normal(entry["name"], seed, count) * entry["std"]).astype(np.float32)
    return values.astype(np.float16).reshape(entry["shape"])


def build_quant_gate_model():
    """The quant-gate model in float32, with the generated (f16-exact) weights, and its recipe."""
    config = quant_gate_config()
    torch.manual_seed(QUANT_GATE_SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    recipe = quant_gate_recipe(model)
    digest = hashlib.sha256()
    by_canonical = {}
    for entry in recipe:
        values = recipe_tensor(entry, QUANT_GATE_SEED)
        digest.update(values.astype("<f2").tobytes())
        by_canonical[entry["name"]] = torch.from_numpy(values.astype(np.float32))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(by_canonical[canonical_name(name)])
    return model, config, recipe, digest.hexdigest()


# llava_gpu::quant's Q4 code book (llama.cpp's IQ4_NL values): nibble n stands for Q4_VALUES[n] * scale.
Q4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)
Q4_MIDPOINTS = ((Q4_VALUES[:-1] + Q4_VALUES[1:]) / 2).astype(np.float32)
# The scales Q4 tries: the value of largest magnitude m over Q4_VALUES[0] + t or Q4_VALUES[15] + t.
Q4_SCALE_DIVISORS = [-127 + t for t in (-4, -2, 0)] + [113 + t for t in (-4, -2, 0)]
GROUP_SIZES = {"q8": 32, "q6": 64, "q4": 64}


def f16_round(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def inverse_of(scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(scale == 0, np.float32(0), np.float32(1) / scale).astype(np.float32)


def fake_quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """Quantize then dequantize a [rows, cols] matrix exactly as llava_gpu::quant does, all in f32
    with f16 scales, groups along rows (GROUP_SIZES). Q8: scale max|w| / 127, round half away from
    zero. Q6: scale m / -32 (m the value of largest magnitude), q in -32..31. Q4: each divisor of
    Q4_SCALE_DIVISORS in turn gives a scale; values go to the nearest code (Q4_MIDPOINTS, a value
    on a midpoint to the lower code); the scale with the smallest squared error (summed in f64)
    wins, the first on ties."""
    rows, cols = values.shape
    groups = values.astype(np.float32).reshape(-1, GROUP_SIZES[kind])
    largest = groups[np.arange(len(groups)), np.abs(groups).argmax(axis=1)]
    if kind == "q4":
        best = np.zeros_like(groups)
        best_error = np.full(len(groups), np.inf)
        for divisor in Q4_SCALE_DIVISORS:
            scale = f16_round(largest / np.float32(divisor))
            codes = np.searchsorted(Q4_MIDPOINTS, groups * inverse_of(scale)[:, None], side="left")
            dequantized = (Q4_VALUES[codes] * scale[:, None]).astype(np.float32)
            error = ((dequantized - groups).astype(np.float64) ** 2).sum(axis=1)
            better = error < best_error
            best[better], best_error[better] = dequantized[better], error[better]
        return best.reshape(rows, cols)
    if kind == "q8":
        scale = f16_round(np.abs(groups).max(axis=1) / np.float32(127))
    else:
        scale = f16_round(largest / np.float32(-32))
    x = groups * inverse_of(scale)[:, None]
    q = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
    q = np.clip(q, -127, 127) if kind == "q8" else np.clip(q, -32, 31)
    return (q * scale[:, None]).astype(np.float32).reshape(rows, cols)


def quantized_kind(canonical: str, shape, precision: str):
    """The runtime's default storage (crates/model/src/files/weights.rs, storage_dtype_keeping). Under q4:
    the language model's attention value/output matrices and token embeddings Q6, its other linear
    layers Q4, the lm_head, vision tower and projector Q8; a matrix whose rows do not split into
    its kind's groups falls back to Q8. Under q8 every quantizable matrix is Q8. None: kept in
    f16/f32."""
    if len(shape) != 2 or shape[1] % 32 != 0 or canonical.startswith("vision_model.embeddings"):
        return None
    kind = "q8"
    if precision == "q4" and canonical.startswith("model."):
        six = canonical.endswith(("self_attn.v_proj.weight", "self_attn.o_proj.weight")) or \
            canonical == "model.embed_tokens.weight"
        kind = "q6" if six else "q4"
    return kind if shape[1] % GROUP_SIZES[kind] == 0 else "q8"


@torch.no_grad()
def fake_quantized_logits(model, inputs, precision: str) -> np.ndarray:
    """First-step logits of `model` with its matrices replaced by their dequantized copies."""
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    try:
        for name, param in model.named_parameters():
            kind = quantized_kind(canonical_name(name), tuple(param.shape), precision)
            if kind is not None:
                param.copy_(torch.from_numpy(fake_quantize(param.numpy(), kind)))
        return model(**inputs, logits_to_keep=1).logits[0, -1].float().numpy()
    finally:
        for name, param in model.named_parameters():
            param.copy_(original[name])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def quant_gate_fixture():
    """models/quant-gate (config, tokenizer and processor files, weights.json) and its expected
    f32 outputs; returns the model and processor."""
    name, spec = QUANT_GATE_MODEL, QUANT_GATE_SPEC
    folder = FIXTURES / "models" / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model, config, recipe, digest = build_quant_gate_model()
    config.save_pretrained(folder)
    processor = build_processor(spec["tokenizer"])
    processor.save_pretrained(folder)
    # The tokenizer.json of the first model with this tokenizer (see write_tokenizer_files).
    homes = {MODELS[m]["tokenizer"]: m for m in reversed(list(MODELS))}
    write_tokenizer_files(spec, folder, homes)
    write_json(folder / "weights.json", {
        "generator": "generate.py generated_normal: value = f16(f32(std * irwin_hall_12(splitmix64)))",
        "seed": QUANT_GATE_SEED,
        "sha256_f16": digest,
        "tensors": recipe,
    })
    cases = []
    for case_id, image_name, question in spec["cases"]:
        _, prompt = chat_prompt(processor, [question], image_first=image_name is not None)
        inputs = model_inputs(processor, prompt, image_name)
        tokens, logits, min_margin, max_abs = greedy(model, inputs)
        if min_margin < QUANT_GATE_MARGIN_FRACTION * max_abs:
            sys.exit(f"{name}/{case_id}: greedy margin {min_margin:.3g} < {QUANT_GATE_MARGIN_FRACTION} * {max_abs:.3g}")
        logits_npy = f"{name}.{case_id}.logits.npy"
        np.save(FIXTURES / "expected" / logits_npy, logits)
        fake = {p: round(cosine(fake_quantized_logits(model, inputs, p), logits), 6) for p in ("q8", "q4")}
        cases.append({"id": case_id, "image": image_name, "question": question, "prompt": prompt,
                      "input_ids": inputs["input_ids"][0].tolist(), "greedy_tokens": tokens,
                      "greedy_text": processor.tokenizer.decode(tokens, skip_special_tokens=True),
                      "min_margin": min_margin, "max_abs_logit_over_steps": max_abs,
                      "logits_npy": logits_npy, "fake_quantized_cosine": fake})
        print(f"{name}/{case_id}: transformers on dequantized weights, cosine {fake}")
    write_json(FIXTURES / "expected" / f"{name}.json", {
        "model": name, "checkpoint": f"models/{name}", "weights": f"models/{name}/weights.json",
        "greedy_steps": GREEDY_STEPS, "cases": cases,
    })


QUANT_CHAOTIC_CASES = [("vicuna-tiny", "rocket_en"), ("mistral-tiny", "rocket_en"), ("tied-f32", "astronaut_en"),
                       ("bf16-tiny", "coffee_en")]


def quant_quality():
    """The quant-gate fixture, and for each tiny fixture above the first-step logits cosine that
    transformers itself gets with the runtime's dequantized weights (expected/quant_quality.json):
    what quantization costs on those weights, whatever runs them."""
    quant_gate_fixture()
    results = []
    for name, case_id in QUANT_CHAOTIC_CASES:
        spec = MODELS[name]
        folder = FIXTURES / "models" / name
        model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(folder)
        expected = json.loads((FIXTURES / "expected" / f"{name}.json").read_text())
        case = next(c for c in expected["cases"] if c["id"] == case_id)
        inputs = model_inputs(processor, case["prompt"], case["image"])
        want = np.load(FIXTURES / "expected" / case["logits_npy"])
        fake = {p: round(cosine(fake_quantized_logits(model, inputs, p), want), 6) for p in ("q8", "q4")}
        results.append({"model": name, "case": case_id, "stored_dtype": DTYPE_NAMES[spec["dtype"]],
                        "fake_quantized_cosine": fake})
        print(f"{name}/{case_id}: transformers on dequantized weights, cosine {fake}")
    write_json(FIXTURES / "expected" / "quant_quality.json", {
        "what": "first-step logits cosine of transformers (f32) with each matrix quantized and dequantized "
                "as the runtime stores it, against the f32 logits of the same case",
        "chaotic_fixtures": results,
    })


# ---------------------------------------------------------------------------------------------

SECTIONS = {
    "tokenizers": tokenizer_cases,
    "chat": chat_cases,
    "preprocess": preprocess_cases,
    "models": models_and_expected,
    "odd_heads": odd_head_models,
    "gelu_tower": gelu_tower_models,
    "liuhaotian": liuhaotian_fixture,
    "chatml": chatml_fixture,
    "quant": quant_quality,
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
