"""The measurements behind the q4 storage mix (docs/converted-format.md, "Quality"): on the
quant-gate model, transformers' first-step logits cosine against f32 with the language model's
matrices fake-quantized in several mixes, and each format's weight error on Gaussian values.
Prints a table; writes nothing.

    python tests/reference/quant_mix.py
"""

import numpy as np
import torch

import generate as G


def q4_0(values: np.ndarray) -> np.ndarray:
    """Format version 1's Q4 (llama.cpp's Q4_0: groups of 32, (n - 8) * m / -8), for comparison."""
    rows, cols = values.shape
    groups = values.astype(np.float32).reshape(-1, 32)
    largest = groups[np.arange(len(groups)), np.abs(groups).argmax(axis=1)]
    scale = G.f16_round(largest / np.float32(-8))
    x = groups * G.inverse_of(scale)[:, None]
    q = np.clip(np.sign(x) * np.floor(np.abs(x) + np.float32(0.5)) + 8, 0, 15) - 8
    return (q * scale[:, None]).astype(np.float32).reshape(rows, cols)


FORMATS = {"q4_0": q4_0, **{k: (lambda k: lambda v: G.fake_quantize(v, k))(k) for k in ("q4", "q6", "q8")}}
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens")


def role(canonical: str):
    return next((r for r in ROLES if f"{r}." in canonical), None) if canonical.startswith("model.") else None


def mix(base: str, **over) -> dict:
    return {r: over.get(r, base) for r in ROLES}


MIXES = [
    ("everything Q8", mix("q8")),
    ("Q4_0 (format version 1's default)", mix("q4_0")),
    ("Q4_0, v/o Q8", mix("q4_0", v_proj="q8", o_proj="q8")),
    ("Q4", mix("q4")),
    ("Q4, v Q8", mix("q4", v_proj="q8")),
    ("Q4, o Q8", mix("q4", o_proj="q8")),
    ("Q4, v/o Q6", mix("q4", v_proj="q6", o_proj="q6")),
    ("Q4, v/o/embed Q6 (the default)", mix("q4", v_proj="q6", o_proj="q6", embed_tokens="q6")),
]


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    gaussian = rng.standard_normal((1024, 256)).astype(np.float32)
    for name, quantize in FORMATS.items():
        error = np.sqrt(((quantize(gaussian) - gaussian) ** 2).mean() / (gaussian ** 2).mean())
        print(f"{name}: weight error {100 * error:.2f} % of RMS on Gaussian values")
    model, *_ = G.build_quant_gate_model()
    processor = G.build_processor(G.QUANT_GATE_SPEC["tokenizer"])
    cases = []
    for case_id, image_name, question in G.QUANT_GATE_SPEC["cases"]:
        _, prompt = G.chat_prompt(processor, [question], image_first=image_name is not None)
        inputs = G.model_inputs(processor, prompt, image_name)
        cases.append((case_id, inputs, model(**inputs, logits_to_keep=1).logits[0, -1].numpy()))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    print("| language model (lm_head, vision tower, projector Q8) | " + " / ".join(c[0] for c in cases) + " |")
    for label, formats in MIXES:
        for name, param in model.named_parameters():
            canonical = G.canonical_name(name)
            kind = G.quantized_kind(canonical, tuple(param.shape), "q8")
            r = role(canonical)
            if kind is not None:
                param.copy_(torch.from_numpy(FORMATS[formats[r] if r else kind](original[name].numpy())))
        cosines = [G.cosine(model(**inputs, logits_to_keep=1).logits[0, -1].numpy(), ref) for _, inputs, ref in cases]
        print(f"| {label} | " + " / ".join(f"{c:.6f}" for c in cosines) + " |", flush=True)
        for name, param in model.named_parameters():
            param.copy_(original[name])


if __name__ == "__main__":
    main()
