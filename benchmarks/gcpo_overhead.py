"""GCPO's step-time overhead over GRPO on the embedded default, for several (G, M, K) settings and code paths.

    python benchmarks/gcpo_overhead.py --steps 4 --settings 8,2,1 4,4,4 --compare textual,default --threads 1

Each run is ``configs/gcpo.yaml`` (GRPO: ``configs/grpo.yaml``) for ``--steps`` steps in its own process, without
validation; the first step is a warm-up and is dropped. For every setting GRPO runs first, then each variant of
``--compare`` (config overrides, see ``VARIANTS``: ``textual`` is the path before issue 10, ``default`` the shipped
config), so that before and after are measured side by side in one invocation; ``--rounds`` repeats the whole
sequence. Prints the median step time (the sum of the logged ``timing/*`` phases that make up a step), its ratio
to the GRPO run of the same round, and the median of each phase and of the ``tokens_per_s/*`` metrics.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEP_PHASES = ("generation", "scoring", "rewards", "graph", "reference", "update")
GRAPH_PHASES = ("integration", "context_generation", "context_representation")


def backend(**init_args: object) -> str:
    """A ``--model.sampler.init_args.backend`` override: ``KVCacheLoop`` with these ``init_args``."""
    import json

    spec = {"class_path": "gcpo_lightning.components.sampling.backends.KVCacheLoop", "init_args": init_args}
    return f"--model.sampler.init_args.backend={json.dumps(spec)}"


NO_CANDIDATE_SCORES = "--model.graph_builder.init_args.score_candidates=false"
NO_CACHE = "--model.graph_builder.init_args.keep_context_cache=false"
CONTEXT = "--model.kl.init_args.policy_context=context"  # the paper's gradient pass on x_i
FROZEN = "--model.kl.init_args.policy_context=context_frozen"
SET = "--model.graph_builder.init_args.context_layout=set"
BATCH512 = "--model.sampler.init_args.generation_batch_size=512"
VARIANTS: dict[str, list[str]] = {
    # the textual-context path as it was before issue 10: one prompt per context row, a KV cache grown by cat
    "textual": [
        backend(preallocate=False, compact=None),
        "--model.graph_builder.init_args.share_prefix=false",
        NO_CANDIDATE_SCORES,
        NO_CACHE,
        CONTEXT,
    ],
    # HEAD 056adf8 (the first half of issue 10): shared prefixes and a preallocated cache, nothing after
    "shared": [backend(compact=None), NO_CANDIDATE_SCORES, NO_CACHE, CONTEXT],
    # + finished rows dropped from the decoding batch
    "compact": [NO_CANDIDATE_SCORES, NO_CACHE, CONTEXT],
    # the shipped config: the paper's gradient pass on x_i, with everything exact of this issue (p_x, p_phi
    # scored during context generation, compaction)
    "default": [],
    # context_frozen as HEAD 056adf8 ran it: x_i encoded again without gradient
    "frozen_reencode": [FROZEN],
    # context_frozen attending to x_i's KV cache kept from context generation
    "frozen": [FROZEN, "--model.graph_builder.init_args.keep_context_cache=true"],
    # the causal KL conditioned on q (no pass on x_i at all): the spec's cheap [decision]
    "query": ["--model.kl.init_args.policy_context=query"],
    # the contexts read as sets ([decision]): one block per group in context generation and in the pass on x_i
    "set": [SET],
    # the same, each row's KV cache holding a copy of its group's block (no cascade attention)
    "set_gather": [SET, backend(cascade=False)],
    # generation in batches of up to 512 rows instead of configs/gcpo.yaml's 64 (fewer decoding steps in all)
    "default_batch512": [BATCH512],
    "set_batch512": [SET, BATCH512],
    # both decisions: contexts as sets, the causal KL conditioned on q
    "set_query": [SET, "--model.kl.init_args.policy_context=query"],
}


def gcpo_setting(G: int, M: int, K: int) -> list[str]:
    """The overrides of ``configs/gcpo.yaml`` for G candidates, M integrated outputs and K samples per context."""
    return [
        f"--model.num_generations={G}",
        f"--model.graph_builder.init_args.num_integrated={M}",
        f"--model.graph_builder.init_args.num_context_samples={K}",
    ]


def run(config: str, steps: int, prompts: int, extra: list[str], threads: int | None) -> dict[str, float]:
    """Median seconds per phase (and median tokens/s) over the steps after the first."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "gcpo_lightning",
            "fit",
            "--config",
            config,
            f"--trainer.max_steps={steps}",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.val_check_interval=100000",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp}",
            "--trainer.logger.name=run",
            "--trainer.logger.version=0",
            f"--data.init_args.batch_size={prompts}",
            *extra,
        ]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode:
            frames = "\n".join(line for line in proc.stderr.splitlines() if "gcpo_lightning/" in line)
            sys.exit(f"{' '.join(cmd)} failed; the kit's frames:\n{frames}\n...\n{proc.stderr[-3000:]}")
        with open(Path(tmp) / "run" / "version_0" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("timing/update")]
    rows = rows[1:] or rows
    measured = [k for k in rows[0] if k.startswith(("tokens_per_s/", "memory/"))]
    keys = [f"timing/{p}" for p in STEP_PHASES + GRAPH_PHASES] + measured
    out = {k.replace("timing/", ""): statistics.median(float(r[k]) for r in rows) for k in keys if rows[0].get(k)}
    out["step"] = statistics.median(
        sum(float(r[f"timing/{p}"]) for p in STEP_PHASES if r.get(f"timing/{p}")) for r in rows
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--settings", nargs="+", default=["8,2,1", "4,4,4"], help="G,M,K")
    parser.add_argument("--compare", default="default", help=f"comma-separated variants of {sorted(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: torch's)")
    parser.add_argument("--no-grpo", action="store_true", help="skip the GRPO baseline")
    parser.add_argument("--gcpo-config", default="configs/gcpo.yaml", help="the GCPO config the variants override")
    parser.add_argument(
        "--deviation",
        action="store_true",
        help="measure how far policy_context=context_frozen moves the gradient, then exit",
    )
    parser.add_argument(
        "--set-deviation",
        action="store_true",
        help="measure how far context_layout=set moves log-probs, U_i and the gradient from the textual contexts",
    )
    args = parser.parse_args(argv)
    if args.deviation:
        return deviation(args.steps)
    if args.set_deviation:
        return set_deviation(args.steps)
    variants = args.compare.split(",")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU used; "
        f"{args.prompts} prompts/step; threads {args.threads or 'default'}; load average at start {load:.2f}"
    )
    print(f"{'method':36s} {'step s':>7s} {'x GRPO':>7s}  phases (s)")
    for rnd in range(args.rounds):
        for setting in args.settings:
            G, M, K = (int(x) for x in setting.split(","))
            base = float("nan")
            if not args.no_grpo:
                grpo = run(
                    "configs/grpo.yaml", args.steps, args.prompts, [f"--model.num_generations={G}"], args.threads
                )
                base = grpo["step"]
                print(f"{f'[{rnd}] GRPO G={G}':36s} {grpo['step']:7.2f} {1.0:7.2f}  {fmt(grpo)}", flush=True)
            for name in variants:
                gcpo = run(
                    args.gcpo_config,
                    args.steps,
                    args.prompts,
                    [*gcpo_setting(G, M, K), *VARIANTS[name]],
                    args.threads,
                )
                print(
                    f"{f'[{rnd}] {Path(args.gcpo_config).stem} G={G} M={M} K={K} {name}':36s} {gcpo['step']:7.2f} "
                    f"{gcpo['step'] / base:7.2f}  {fmt(gcpo)}",
                    flush=True,
                )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at end {load:.2f}")


def deviation(steps: int = 3, seed: int = 0) -> None:
    """How far ``policy_context: context_frozen`` moves the update from the paper's ``context`` on the embedded
    model (configs/gcpo.yaml's components, G=8, M=2, K=1, 8 prompts): per rollout, the loss values and the cosine
    and norm ratio of the gradients of the whole loss and of the causal-KL term alone (kappa 0.06 minus kappa 0)."""
    import torch

    module, dm = embedded_module(seed)
    models = module.models()
    params = [p for p in module.policy.parameters() if p.requires_grad]
    for step, batch in zip(range(steps), dm.train_dataloader()):
        rollout = module.sampler.sample(models, module.prompts_for(batch), 8)
        rollout.rows = batch
        rewards, _ = module.score_rewards(rollout)
        graph = module.graph_builder.build(rollout, models, module.sampler)
        adv = module.adjuster.adjust(rewards, rollout, graph, batch_rewards=rewards)
        prepared = module.kl.prepare(rollout, graph, models)
        grads, losses = {}, {}
        for ctx in ("context", "context_frozen"):
            for kappa in (0.06, 0.0):
                module.kl.policy_context, module.kl.kappa = ctx, kappa
                loss, _ = module.compute_loss(rollout, adv.values, prepared, models)
                grads[ctx, kappa] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
                losses[ctx, kappa] = loss.item()
        module.kl.kappa = 0.06
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
        causal = {c: grads[c, 0.06] - grads[c, 0.0] for c in ("context", "context_frozen")}
        print(
            f"rollout {step}: loss context {losses['context', 0.06]:.6f} frozen {losses['context_frozen', 0.06]:.6f}"
            f"; grad cos (whole loss) {cos(grads['context', 0.06], grads['context_frozen', 0.06]):.4f}, norm ratio "
            f"{float(grads['context_frozen', 0.06].norm() / grads['context', 0.06].norm()):.4f}; causal-KL term: "
            f"cos {cos(causal['context'], causal['context_frozen']):.4f}, norm ratio "
            f"{float(causal['context_frozen'].norm() / causal['context'].norm()):.4f}",
            flush=True,
        )


def embedded_module(seed: int, **builder_args: object):
    """configs/gcpo.yaml's components (G=8, M=2, K=1) on the shipped tiny-arith, and its data module."""
    import torch

    from gcpo_lightning import (
        ArithmeticDataModule,
        CausalAdvantage,
        CausalProjectedKL,
        ColliderGraphBuilder,
        GCPOModule,
        GroupSampler,
    )
    from gcpo_lightning.policy.builder import PolicyBuilder

    torch.manual_seed(seed)
    module = GCPOModule(
        policy_builder=PolicyBuilder("tiny-arith", use_chat_template=False),
        sampler=GroupSampler(max_completion_length=64, generation_batch_size=64),
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=1, **builder_args),  # type: ignore[arg-type]
        adjuster=CausalAdvantage(alpha=2.0),
        kl=CausalProjectedKL(beta=0.04, kappa=0.06, max_ratio=10.0),
        num_generations=8,
    )
    module.configure_model()
    dm = ArithmeticDataModule(batch_size=8, seed=seed)
    dm.setup("fit")
    return module, dm


def set_deviation(rollouts: int = 3, seed: int = 0) -> None:
    """How far ``context_layout: set`` moves GCPO's quantities from the textual contexts on the embedded model.

    Per rollout (the same candidates and integrated outputs for both layouts): the log-probs ``log p(y_i | x_{i,l})``
    (max and mean absolute difference over real tokens, next to the mean shift the context itself causes against
    ``log p(y_i | q)``), ``p'_ref``, the weights ``U_i`` with sampled context samples (against the noise floor of the
    textual layout under another seed) and with greedy ones, and the cosine of the gradients of the causal-KL term
    and of the whole loss."""
    import torch

    from gcpo_lightning.functional.causal import causal_target, causal_weights

    module, dm = embedded_module(seed)
    builder, models = module.graph_builder, module.models()
    params = [p for p in module.policy.parameters() if p.requires_grad]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731

    def graph(layout: str, graph_seed: int, greedy: bool = False):
        builder.context_layout = layout
        temperature = module.sampler.temperature
        module.sampler.temperature = 0.0 if greedy else temperature
        torch.manual_seed(graph_seed)
        try:
            return builder.build(rollout, models, module.sampler)
        finally:
            module.sampler.temperature = temperature

    def weights_of(g) -> torch.Tensor:
        """``U_i`` of a graph (paper Eq. 11) with the adjuster's alpha and similarity."""
        target = causal_target(g.representations, g.context_representations, rollout.group_size)
        return causal_weights(g.representations, target, module.adjuster.alpha, module.adjuster.similarity)

    for step, batch in zip(range(rollouts), dm.train_dataloader()):
        rollout = module.sampler.sample(models, module.prompts_for(batch), 8)
        rollout.rows = batch
        rewards, _ = module.score_rewards(rollout)
        text, sets, other = graph("text", step), graph("set", step), graph("text", step + 1000)
        assert text.integrated == sets.integrated
        real = rollout.completion_mask.bool().unsqueeze(1).expand_as(text.context_logps)  # [N, M, T]
        delta = (text.context_logps - sets.context_logps)[real].abs()
        shift = (text.context_logps[:, 0] - rollout.old_logps)[real[:, 0]].abs().mean()
        u = {}
        for name, g in (("text", text), ("set", sets), ("other", other)):
            adv = module.adjuster.adjust(rewards, rollout, g, batch_rewards=rewards)
            prepared = module.kl.prepare(rollout, g, models)
            grads = {}
            for kappa in (0.06, 0.0):
                module.kl.kappa = kappa
                loss, _ = module.compute_loss(rollout, adv.values, prepared, models)
                grads[kappa] = torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)])
            module.kl.kappa = 0.06
            u[name] = (g, prepared, grads)
        weights = {k: weights_of(v[0]) for k, v in u.items()}
        greedy = {k: graph(k, step, greedy=True) for k in ("text", "set")}
        greedy_u = {k: weights_of(g) for k, g in greedy.items()}
        ref = u["text"][1].causal_ref_logps[real[:, 0]] - u["set"][1].causal_ref_logps[real[:, 0]]
        causal = {k: v[2][0.06] - v[2][0.0] for k, v in u.items()}
        print(
            f"rollout {step}: |d log p(y|x)| max {delta.max():.3f} mean {delta.mean():.4f} (context vs q: mean "
            f"{shift:.4f}); |d log p'_ref| mean {ref.abs().mean():.4f}; U_i |set - text| mean "
            f"{(weights['set'] - weights['text']).abs().mean():.4f} (text, other seed: "
            f"{(weights['other'] - weights['text']).abs().mean():.4f}); greedy U_i |set - text| mean "
            f"{(greedy_u['set'] - greedy_u['text']).abs().mean():.4f}; causal-KL grad cos "
            f"{cos(causal['text'], causal['set']):.4f}, whole-loss grad cos "
            f"{cos(u['text'][2][0.06], u['set'][2][0.06]):.4f} "
            f"(text, other seed {cos(u['text'][2][0.06], u['other'][2][0.06]):.4f})",
            flush=True,
        )


def fmt(phases: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.0f}" if k.startswith("tokens_per_s") else f"{k} {v:.2f}" for k, v in phases.items() if k != "step"
    )


if __name__ == "__main__":
    main()
