"""Tokens/s of a sampler on tiny-arith (or a model folder): ``python tests/vllm_engine/bench_sampler.py {vllm,group}``.

Not a test (pytest does not collect it). ``group`` (the kit's KVCacheLoop) runs in ``.venv``: in ``.venv-vllm``
transformers < 5.20 ignores the loop's ``cache=`` keyword. ``vllm`` runs in ``.venv-vllm``. Generation time only
(``timing/generation``), ``--prompts`` x ``--G`` completions of up to ``--tokens`` tokens at T=1, after one warm-up.
"""

from __future__ import annotations

import argparse
import random
import statistics

from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask
from gcpo_lightning.data.templates import PROMPT_TEMPLATE
from gcpo_lightning.interfaces.containers import PolicyModels
from gcpo_lightning.policy.builder import PolicyBuilder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sampler", choices=["vllm", "group"])
    parser.add_argument("--model", default="tiny-arith")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    built = PolicyBuilder(model_name_or_path=args.model, use_chat_template=False).build(False, "cpu")
    models = PolicyModels(built.policy, built.tokenizer, None, 1.0)
    rng = random.Random(0)
    prompts = [PROMPT_TEMPLATE.format(question=ArithmeticTask().sample_question(rng)) for _ in range(args.prompts)]
    if args.sampler == "vllm":
        from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

        sampler: object = VLLMSampler(max_completion_length=args.tokens)
    else:
        from gcpo_lightning.components.sampling.group_sampler import GroupSampler

        sampler = GroupSampler(max_completion_length=args.tokens)
    rates = []
    for i in range(args.repeats + 1):
        rollout = sampler.sample(models, prompts, args.G, score=False)  # type: ignore[attr-defined]
        if i:  # the first call builds the engine / warms up
            rates.append(float(rollout.completion_mask.sum()) / rollout.metrics["timing/generation"])
    print(
        f"{args.sampler} {args.model} {args.prompts}x{args.G}x{args.tokens}: median {statistics.median(rates):.0f} "
        f"tok/s over {args.repeats} ({', '.join(f'{r:.0f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
