"""Memory of the frozen reference: full precision, bf16, 4-bit NF4, and LoRA's adapter-off view (measured).

    python benchmarks/reference_memory.py [--model smollm2-135m-instruct]

Loads the model each way (``from_pretrained``; 4-bit through transformers' bitsandbytes integration) and prints
its weight memory (``model_memory_bytes``: parameters, buffers and 4-bit scale tables) and how far its
log-probs of completions sampled from the fp32 model (chat-templated real prompts) are from the fp32 ones.
"""

from __future__ import annotations

import argparse

import torch

from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer
from gcpo_lightning.policy.quantization import (
    QuantizationConfig,
    count_4bit_linears,
    load_quantized,
    model_memory_bytes,
)

PROMPTS = [
    "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many apples are left?",
    "What is the derivative of x^3 + 2x?",
    "Write a Python function that returns the sum of a list.",
    "A train travels 60 km in 45 minutes. What is its speed in km/h?",
]


def sampled_completions(model: torch.nn.Module, tokenizer, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Prompts and 32-token completions sampled from ``model`` (the fp32 one): what a rollout would score."""
    from gcpo_lightning.components.sampling.decoding import decode

    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        completion = decode(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            32,
            [tokenizer.eos_token_id],
            tokenizer.pad_token_id,
            1.0,
            1.0,
            0,
            False,
            32,
        )
    return enc["input_ids"], enc["attention_mask"], completion


def completion_logps(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-token log-probs of the sampled completions under ``model``.  ``[4, 32]``."""
    prompt_ids, prompt_mask, completion = batch
    with torch.no_grad():
        return score_completions(model, prompt_ids, prompt_mask, completion, torch.ones_like(completion)).logps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    tok = load_tokenizer(args.model)
    variants = {
        "fp32": lambda: load_causal_lm(args.model),
        "bf16": lambda: load_causal_lm(args.model, {"dtype": "bfloat16"}),
        "nf4 (+ bf16 rest)": lambda: load_quantized(
            args.model, {"dtype": "bfloat16"}, QuantizationConfig(compute_dtype="bfloat16")
        ),
        "nf4 (+ fp32 rest)": lambda: load_quantized(args.model, None, QuantizationConfig()),
    }
    base, batch = None, None
    print(f"{args.model}: reference weight memory and mean |log-prob - fp32| on {len(PROMPTS)}x32 sampled tokens")
    for name, load in variants.items():
        model = load().eval()
        batch = batch or sampled_completions(model, tok)
        logps = completion_logps(model, batch).float()
        base = logps if base is None else base
        mib = model_memory_bytes(model) / 2**20
        print(
            f"  {name:<18} {mib:8.1f} MiB  4-bit linears {count_4bit_linears(model):4d}  "
            f"mean |dlogp| {(logps - base).abs().mean().item():.4f}"
        )
        del model
    print("  LoRA reference        0.0 MiB extra (the policy's own weights with the adapters disabled)")


if __name__ == "__main__":
    main()
