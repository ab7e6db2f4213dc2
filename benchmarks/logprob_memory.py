"""Peak memory of one scoring forward + backward, with and without ``logits_chunk_size`` (CPU, measured).

    python benchmarks/logprob_memory.py [--vocab 49152] [--rows 8] [--tokens 512] [--chunks none 4 1]

Each setting runs in a fresh process, which reports its peak resident memory (``ru_maxrss``) before and after
scoring; the difference is what scoring added. The model is a random 2-layer Llama with SmolLM2's vocabulary
(the LM head dominates), so the numbers isolate the logits. The log-probs of every setting are compared with the
unchunked ones.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def measure(vocab: int, rows: int, tokens: int, chunk: int | None) -> dict[str, float]:
    """Build the model, score once with gradients, return the peak-memory growth (MiB) and the log-probs' sum."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gcpo_lightning.components.scoring.logprobs import score_completions

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    prompt = torch.randint(0, vocab, (rows, 32))
    completion = torch.randint(0, vocab, (rows, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scores = score_completions(
        model, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion), logits_chunk_size=chunk
    )
    scores.logps.mean().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"added_mib": after - before, "model_mib": before, "logps": scores.logps.detach().double().sum().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunks", nargs="+", default=["none", "4", "1"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        chunk = None if args.child == "none" else int(args.child)
        print(json.dumps(measure(args.vocab, args.rows, args.tokens, chunk)))
        return
    full_logits = args.rows * (args.tokens + 1) * args.vocab * 4 / 2**20
    print(
        f"vocab {args.vocab}, {args.rows} rows x {args.tokens} completion tokens "
        f"(one fp32 [N, T, V] logits tensor: {full_logits:.0f} MiB)"
    )
    reference = None
    for chunk in args.chunks:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            chunk,
            "--vocab",
            str(args.vocab),
            "--rows",
            str(args.rows),
            "--tokens",
            str(args.tokens),
        ]
        result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        reference = result["logps"] if reference is None else reference
        print(
            f"logits_chunk_size={chunk:>4}: scoring added {result['added_mib']:7.0f} MiB peak "
            f"(model + inputs {result['model_mib']:.0f} MiB); sum of log-probs differs by "
            f"{abs(result['logps'] - reference):.2e}"
        )


if __name__ == "__main__":
    main()
