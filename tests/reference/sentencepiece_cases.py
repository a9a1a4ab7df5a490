"""Reference ids for folders that ship only a SentencePiece `tokenizer.model`.

For the fixture model in tests/fixtures/sentencepiece/ and a few `tokenizer_config.json` /
`config.json` variants, writes what transformers' `AutoTokenizer.from_pretrained(folder)` encodes
(with and without special tokens) and decodes into tests/fixtures/sentencepiece/cases.json.
Needs `sentencepiece` and `protobuf` next to transformers (its slow->fast conversion reads the
protobuf with them). Deterministic: re-running rewrites a byte-identical file.

    python tests/reference/sentencepiece_cases.py
"""

import json
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sentencepiece"
MODEL = FIXTURES / "mistral-7b-v0.1" / "tokenizer.model"

SPECIAL_0_2 = {
    str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    for i, c in enumerate(["<unk>", "<s>", "</s>"])
}

# (name, tokenizer_config.json, config.json model_type or None)
VARIANTS = [
    # The original liuhaotian/llava-v1.6-mistral-7b layout: LlamaTokenizer, legacy, BOS added.
    (
        "llava_mistral_legacy",
        {
            "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": SPECIAL_0_2,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
            "clean_up_tokenization_spaces": False, "legacy": True, "tokenizer_class": "LlamaTokenizer",
        },
        "llava_mistral",
    ),
    # Same without legacy (Metaspace "first") and without config.json.
    (
        "llama_non_legacy",
        {"add_bos_token": True, "legacy": False, "pad_token": "<unk>", "tokenizer_class": "LlamaTokenizer"},
        None,
    ),
    # No prefix space, no BOS, an added <image> token and a new <pad> token.
    (
        "llama_no_prefix_added_tokens",
        {
            "add_prefix_space": False, "pad_token": "<pad>", "tokenizer_class": "LlamaTokenizerFast",
            "added_tokens_decoder": {
                "32000": {"content": "<image>", "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True},
            },
        },
        None,
    ),
    # A llava_next model folder: transformers' TokenizersBackend built from the proto.
    (
        "llava_next_backend",
        {"add_bos_token": True, "tokenizer_class": "LlamaTokenizer"},
        "llava_next",
    ),
]

TEXTS = [
    "",
    " ",
    "\n",
    "   ",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces    here",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues",
    "\n starts with a newline",
    "中文测试：你好，世界！",
    "日本語のテキストです。",
    "emoji 😀🎉 and symbols ∑∫≈ ©®",
    "rare \U0010fffd and \u0378 bytes",
    "ẞ Ǆ ﬁ Ω",
    "123456789 3.14159",
    "<image>\nWhat is shown in this image?",
    "[INST] <image>\nDescribe the picture. [/INST]",
    "USER: hi</s>ASSISTANT: hello</s>",
    "<s>[INST] a [/INST] b</s>",
    "<unk> literal",
    "\u2581metaspace\u2581char",
    "a<pad>b",
]


def main():
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, tokenizer_config, model_type in VARIANTS:
            folder = Path(tmp) / name
            folder.mkdir()
            shutil.copy(MODEL, folder / "tokenizer.model")
            (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
            if model_type is not None:
                (folder / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
            tokenizer = AutoTokenizer.from_pretrained(folder)
            cases = []
            for text in TEXTS:
                for add_special_tokens in (True, False):
                    ids = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
                    cases.append(
                        {
                            "text": text,
                            "add_special_tokens": add_special_tokens,
                            "ids": ids,
                            "decoded": tokenizer.decode(ids, skip_special_tokens=True),
                            "decoded_with_special": tokenizer.decode(ids, skip_special_tokens=False),
                        }
                    )
            variants.append(
                {
                    "name": name,
                    "tokenizer_class": type(tokenizer).__name__,
                    "tokenizer_config": tokenizer_config,
                    "model_type": model_type,
                    "vocab_size": len(tokenizer),
                    "cases": cases,
                }
            )
    out = {"transformers": transformers.__version__, "variants": variants}
    path = FIXTURES / "cases.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{path}: {sum(len(v['cases']) for v in variants)} cases in {len(variants)} variants")


if __name__ == "__main__":
    main()
