#!/usr/bin/env python
"""One GRPO training step: ours (``GCPOModule`` under a Lightning ``Trainer``) against TRL 1.16's ``GRPOTrainer``.

Commands::

    HF_HUB_OFFLINE=1 python benchmarks/step_vs_trl.py --threads 1    # CPU, one intra-op thread (docs/benchmarks.md)
    HF_HUB_OFFLINE=1 python benchmarks/step_vs_trl.py                # CPU, torch's default thread count
    HF_HUB_OFFLINE=1 python benchmarks/step_vs_trl.py --device cuda  # on a GPU

What one step is, on both sides (the same work): generate ``G`` completions for each of ``--num-prompts``
arithmetic prompts, score what the step needs without gradients (the reference model when ``beta > 0``; ours
also re-scores the rollout under the policy for ``old_logps``, see below), compute the rewards
(:func:`gcpo_lightning.rewards.arithmetic.arithmetic_accuracy` on both sides) and advantages, then one
forward/backward pass and one AdamW step over all ``N = B*G`` completions (``num_iterations=1``, no gradient
accumulation).

Kept equal on both sides: the model and its weights (``--model``: the shipped ``tiny-arith`` when it is there,
else a random tiny Llama from ``tests/conftest.py``'s ``save_tiny_llama`` with ``--hidden``/``--layers``), the
prompts and their order (the first rows of :class:`gcpo_lightning.data.datamodules.ArithmeticDataModule`,
unshuffled), ``G``,
the maximum completion length, temperature 1 / top-p 1 / no top-k, ``beta``, the clip range, ``loss_type``,
AdamW (lr 1e-4, weight decay 0.01, grad-norm clip 1.0), fp32. Three TRL defaults that would make TRL do different
work are switched off: ``bf16`` (on by default even on CPU), ``gradient_checkpointing`` (on by default) and
``use_bias_correction_kl`` (different KL maths; see tests/component/test_trl_parity.py). Completion length: with
sampling
it differs from run to run, so by default both sides suppress EOS until ``max_completion_length`` tokens
(``min_new_tokens``: TRL through ``generation_kwargs``, ours through ``GroupSampler(min_new_tokens=...)``), which
makes every completion exactly that long and the work identical; ``--natural-length`` turns that off and the
completion tokens per second are printed either way.

Each side runs ``--rounds`` times (a fresh model and trainer each time; ABBA order, so load drift on a shared
machine hits both sides alike), each round ``--warmup`` unmeasured steps then ``--repeats`` measured ones.

Printed: the median step time over all measured steps, for each side (and per-round medians), and the ratio
ours/TRL; completion tokens per second; peak memory during the measured steps (CUDA: ``max_memory_allocated``
above what was allocated before; CPU: the peak resident set size, ``VmHWM`` of ``/proc/self/status`` reset
through ``/proc/self/clear_refs``, above the RSS at the reset, which counts allocator caches and everything
else in the process, so only a rough figure, and order-dependent because the second side can reuse memory the
first one freed; falls back to ``getrusage`` max RSS deltas where ``clear_refs`` is not writable); our per-phase
timings (the module's ``timing/*`` metrics) and TRL's, rebuilt from its own profiling hooks
(``trl.extras.profiling.ProfilingContext``) and the step time.

On a shared CPU, run it when the load is low (``uptime``): timings of small models are dominated by thread
scheduling when other processes compete for the cores (``--threads 1`` is much less sensitive to that).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

OUR_PHASES = ("generation", "scoring", "rewards", "graph", "reference", "update")


# ----- measurement helpers -------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory above the level at :meth:`start`; see the module docstring for what each method counts."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device == "cuda" else "VmHWM via /proc/self/clear_refs"
        self.base = 0

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.base = self._status("VmRSS")
        except OSError:
            self.method = "getrusage(RUSAGE_SELF).ru_maxrss delta (only grows: 0 when below an earlier peak)"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("VmHWM"):
            return max(self._status("VmHWM") - self.base, 0)
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base, 0)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ----- set-up shared by both sides ---------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    """``(path, description)`` of the model both sides load."""
    from gcpo_lightning.policy.loading import SHIPPED

    if args.model == "auto":
        shipped = SHIPPED["tiny-arith"]
        if (shipped / "config.json").exists():
            return str(shipped), "shipped tiny-arith"
        args.model = "random"
    if args.model == "random":
        from conftest import save_tiny_llama

        path = save_tiny_llama(workdir / "tiny-llama", seed=args.seed, hidden=args.hidden, layers=args.layers)
        return str(path), f"random tiny Llama (hidden {args.hidden}, {args.layers} layers, tests/conftest.py)"
    from gcpo_lightning.policy.loading import resolve_model_path

    return resolve_model_path(args.model), args.model


def prompt_rows(args: argparse.Namespace, steps: int) -> list[dict[str, Any]]:
    """The first ``steps * num_prompts`` training rows of the arithmetic task, in a fixed order."""
    from gcpo_lightning.data.datamodules import ArithmeticDataModule

    dm = ArithmeticDataModule(
        num_train=max(steps * args.num_prompts * 2, 64), num_val=16, seed=args.seed, batch_size=args.num_prompts
    )
    dm.setup("fit")
    return dm.train_rows[: steps * args.num_prompts]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----- ours -----------------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, model_path: str, rows: list[dict[str, Any]], workdir: Path) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from gcpo_lightning import GCPOModule, GroupSampler, ReferenceKL
    from gcpo_lightning.data.datamodules import collate_rows
    from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy

    torch.manual_seed(args.seed)
    module = GCPOModule(
        model_name_or_path=model_path,
        reward_funcs=[arithmetic_accuracy],
        sampler=GroupSampler(
            temperature=args.temperature,
            top_p=1.0,
            top_k=0,
            max_completion_length=args.max_completion_length,
            min_new_tokens=0 if args.natural_length else args.max_completion_length,
        ),
        kl=ReferenceKL(beta=args.beta),
        num_generations=args.num_generations,
        num_iterations=1,
        epsilon=args.epsilon,
        loss_type=args.loss_type,
        max_grad_norm=1.0,
        use_chat_template=False,
        log_completions_every_n_steps=0,
    )
    module.configure_model()  # idempotent; done here so that the model is loaded before timing starts
    steps = args.warmup + args.repeats
    captured: list[dict[str, float]] = []
    log_step = module.log_step

    def capture(rollout, rewards, per_func, metrics):  # the module's own per-step metrics, timing/* included
        log_step(rollout, rewards, per_func, metrics)
        captured.append(dict(metrics))

    module.log_step = capture
    memory = PeakMemory(args.device)
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                memory.start()
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            times.append(time.perf_counter() - self.t0)

    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepTimer()],
        default_root_dir=str(workdir / "ours"),
    )
    loader = DataLoader(rows, batch_size=args.num_prompts, shuffle=False, collate_fn=collate_rows)
    trainer.fit(module, train_dataloaders=loader)
    peak = memory.stop()
    measured = captured[args.warmup :]
    step_times = times[args.warmup :]
    per_step = []
    for m, total in zip(measured, step_times):
        split = {p: m.get(f"timing/{p}", 0.0) for p in OUR_PHASES}
        split["other (logging, Lightning loop)"] = total - sum(split.values())
        per_step.append(split)
    lengths = [m["completions/mean_length"] for m in measured]
    return dict(
        steps=step_times,
        per_step=per_step,
        peak=peak,
        memory_method=memory.method,
        lengths=lengths,
        params=count_params(module.policy),
    )


# ----- TRL ------------------------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, model_path: str, rows: list[dict[str, Any]], workdir: Path) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.extras.profiling import ProfilingContext

    from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer
    from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy

    events: list[tuple[str, float]] = []
    original_log = ProfilingContext._log_metrics

    def record(self, duration):  # TRL's own profiling hooks, collected instead of sent to a tracker
        events.append((self.name.split(".", 1)[-1], duration))
        original_log(self, duration)

    ProfilingContext._log_metrics = record
    torch.manual_seed(args.seed)
    N = args.num_prompts * args.num_generations
    steps = args.warmup + args.repeats
    config = trl.GRPOConfig(
        output_dir=str(workdir / "trl"),
        use_cpu=args.device == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        use_bias_correction_kl=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        max_steps=steps,
        per_device_train_batch_size=N,
        gradient_accumulation_steps=1,
        num_generations=args.num_generations,
        num_iterations=1,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=args.epsilon,
        loss_type=args.loss_type,
        scale_rewards="group",
        learning_rate=1e-4,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        shuffle_dataset=False,
        seed=args.seed,
        dataloader_num_workers=0,
        log_completions=False,
        generation_kwargs=None if args.natural_length else {"min_new_tokens": args.max_completion_length},
    )
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_accuracy,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    memory = PeakMemory(args.device)
    times: list[float] = []
    per_step: list[dict[str, float]] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup:
                memory.start()
            events.clear()
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            sync(args.device)
            total = time.perf_counter() - self.t0
            times.append(total)
            per_step.append(trl_phases(events, total))
            lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    trainer.add_callback(StepTimer())
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line is noise here
    try:
        trainer.train()
    finally:
        ProfilingContext._log_metrics = original_log
    peak = memory.stop()
    return dict(
        steps=times[args.warmup :],
        per_step=per_step[args.warmup :],
        peak=peak,
        memory_method=memory.method,
        lengths=lengths[args.warmup :],
        params=count_params(trainer.model),
    )


def trl_phases(events: list[tuple[str, float]], total: float) -> dict[str, float]:
    """TRL's step split like ours, from its profiling events in the order they finished.

    ``_get_per_token_logps_and_entropies`` finishing before ``_prepare_inputs`` scored the rollout (the reference
    model; TRL skips the old-logps pass when ``num_iterations == 1``); later ones are the loss's forward pass.
    """
    names = [n for n, _ in events]
    end = names.index("_prepare_inputs") if "_prepare_inputs" in names else len(events)
    before = events[:end]
    rollout = events[end][1] if end < len(events) else 0.0
    generation = sum(d for n, d in before if n == "transformers.generate")
    scoring = sum(d for n, d in before if n == "_get_per_token_logps_and_entropies")
    rewards = sum(d for n, d in before if n == "_calculate_rewards")
    return {
        "generation": generation,
        "reference (rollout scoring)": scoring,
        "rewards": rewards,
        "rest of rollout (tokenise/decode/advantages)": rollout - generation - scoring - rewards,
        "update (loss fwd + bwd + optimizer)": total - rollout,
    }


# ----- report ---------------------------------------------------------------------------------------------------


def pool(args: argparse.Namespace, runs: list[dict]) -> dict:
    """One side's rounds pooled: medians over every measured step of every round."""
    steps = [t for r in runs for t in r["steps"]]
    per_step = [p for r in runs for p in r["per_step"]]
    mean_length = statistics.mean(x for r in runs for x in r["lengths"])
    return dict(
        step=median(steps),
        steps=steps,
        round_medians=[median(r["steps"]) for r in runs],
        phases={k: median([p[k] for p in per_step]) for k in per_step[0]},
        peaks=[r["peak"] for r in runs],
        memory_method=runs[0]["memory_method"],
        mean_length=mean_length,
        params=runs[0]["params"],
        tokens=args.num_prompts * args.num_generations * mean_length,
    )


def report(args: argparse.Namespace, model_desc: str, results: dict[str, dict]) -> None:
    mib = 1024**2
    print(
        f"\nmodel: {model_desc}; device: {args.device}; torch threads: {torch.get_num_threads()}; "
        f"load average now: {load_average()}"
    )
    print(
        f"B={args.num_prompts} prompts x G={args.num_generations} = {args.num_prompts * args.num_generations} "
        f"completions, max_completion_length={args.max_completion_length}, beta={args.beta}, "
        f"loss_type={args.loss_type}, forced length: {not args.natural_length}; {args.rounds} round(s) per side "
        f"(alternating order), each {args.warmup} warm-up step(s) + {args.repeats} measured; medians over all "
        f"measured steps"
    )
    for name, r in results.items():
        print(
            f"\n[{name}] params={r['params']:,}  step={r['step']:.3f}s  "
            f"(per-round medians: {', '.join(f'{t:.3f}' for t in r['round_medians'])}; "
            f"min {min(r['steps']):.3f}, max {max(r['steps']):.3f})"
        )
        print(f"  completion length (mean)={r['mean_length']:.1f}  completion tokens/s={r['tokens'] / r['step']:.1f}")
        print(
            f"  peak memory above start of measured steps, per round: "
            f"{', '.join(f'{x / mib:.1f}' for x in r['peaks'])} MiB ({r['memory_method']})"
        )
        print("  phases (median of each over the measured steps):")
        for phase, t in r["phases"].items():
            print(f"    {phase:<45} {t:8.3f}s  {100 * t / r['step']:5.1f}%")
    if "ours" in results and "trl" in results:
        ours, trl = results["ours"], results["trl"]
        print(
            f"\nratio ours/TRL (median step time): {ours['step'] / trl['step']:.2f}  "
            f"(tokens/s ratio ours/TRL: {(ours['tokens'] / ours['step']) / (trl['tokens'] / trl['step']):.2f})"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="auto", help="'auto' (shipped tiny-arith, else random), 'random', or a path")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the random model")
    p.add_argument("--layers", type=int, default=4, help="layers of the random model")
    p.add_argument("--num-prompts", type=int, default=4, help="B, prompts per step")
    p.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--epsilon", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "dapo", "dr_grpo"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="measured steps per round")
    p.add_argument("--rounds", type=int, default=6, help="fresh runs per side, alternating which side goes first")
    p.add_argument("--natural-length", action="store_true", help="let EOS end completions (lengths then differ)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--which", default="both", choices=["both", "ours", "trl"])
    p.add_argument("--order", default="ours-first", choices=["ours-first", "trl-first"], help="order of round 1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_path, model_desc = resolve_model(args, workdir)
        rows = prompt_rows(args, args.warmup + args.repeats)
        print(f"load average before: {load_average()}")
        sides = ["ours", "trl"] if args.which == "both" else [args.which]
        if args.order == "trl-first":
            sides.reverse()
        runners = {"ours": run_ours, "trl": run_trl}
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(args.rounds):  # ABBA...: each side goes first equally often, so load drift hits both
            for side in sides if r % 2 == 0 else sides[::-1]:
                runs[side].append(runners[side](args, model_path, rows, workdir / f"{side}-{r}"))
        results = {k: pool(args, runs[k]) for k in ("ours", "trl") if k in runs}
        report(args, model_desc, results)


if __name__ == "__main__":
    main()
