"""GRPO vs GCPO vs the paper's two ablations on the embedded task: many seeds, paired, with 95% intervals.

    python benchmarks/compare_methods.py --seeds 0 1 2 3 4 5 6 7 --max-steps 30 --val-every 10 \\
        --num-val 1000 --jobs 2 --threads 1 --method-steps GRPO=150 --out runs/compare

Each (method, seed) is one ``python -m gcpo_lightning fit`` of the method's shipped config, with seed ``s`` setting
both ``seed_everything`` and the data order, so that two methods with the same seed start from the same model,
see the prompts in the same order and are scored on the same ``--num-val`` held-out questions (greedy). Runs are
separate processes (``--jobs`` at a time, ``--threads`` torch threads each); a finished run (its ``metrics.csv``
holds the last evaluation) is read back rather than run again, so the command resumes after a stop.

Written into ``--out``:

- ``results.md``: per method and evaluated step, the mean held-out accuracy with its 95% Student-t interval over
  seeds and the mean training seconds; per method, the paired difference to ``--baseline`` (GRPO) by seed, with
  its t and bootstrap intervals, at every common step and at equal training time (the baseline's accuracy at its
  last evaluation within the other method's training seconds of the same seed: what a user gets for the same
  compute);
- ``results.png``: accuracy against steps and against training seconds, mean with the 95% band;
- ``runs.json``: every run's accuracy by step and training seconds, for other analyses.

Training seconds are the sum of the logged ``timing/step`` (``gcpo_lightning/reporting/clock.py``): evaluations,
model loading and start-up are left out, so ``--jobs``/``--threads`` and the machine set them; say which.
``--method-steps GRPO=150`` gives one method more steps (the same ``--val-every``), so that its curve against
training time reaches that of the slower methods.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gcpo_lightning.reporting.csvfile import read_rows  # noqa: E402
from gcpo_lightning.reporting.intervals import (  # noqa: E402
    Interval,
    bootstrap_interval,
    paired_differences,
    t_interval,
)
from gcpo_lightning.reporting.runs import build_run  # noqa: E402

METHODS = {
    "GRPO": "configs/grpo.yaml",
    "GCPO": "configs/gcpo.yaml",
    "GCPO w/o weighting": "configs/gcpo_no_weighting.yaml",
    "GCPO w/o causal KL": "configs/gcpo_no_causal_kl.yaml",
    "GCPO set contexts": "configs/gcpo.yaml configs/overlays/set_contexts.yaml",
}
"""Each method's config files (space-separated: later ones are overlays)."""
ACCURACY = "val/accuracy"


@dataclass
class RunResult:
    """One finished (method, seed): held-out accuracy and training seconds at each evaluated step."""

    method: str
    seed: int
    accuracy: dict[int, float]
    seconds: dict[int, float]
    wall: float | None = None
    """Elapsed seconds of the whole process (start-up and evaluations included); ``None``: read back, not run."""


def run_dir(out: Path, method: str, seed: int) -> Path:
    """Where the run of ``method`` with ``seed`` logs (``.../run/version_0/metrics.csv``)."""
    return out / method.replace(" ", "_").replace("/", "") / f"seed{seed}"


def fit_command(method: str, seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    """The ``fit`` command line of one run."""
    return [
        sys.executable,
        "-m",
        "gcpo_lightning",
        "fit",
        *[arg for config in METHODS[method].split() for arg in ("--config", config)],
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.num_val={args.num_val}",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={run_dir(args.out, method, seed)}",
        "--trainer.logger.name=run",
        "--trainer.logger.version=0",
    ]


def read_result(method: str, seed: int, out: Path) -> RunResult | None:
    """The run's accuracy and training seconds by step from its ``metrics.csv``; ``None`` if there is none."""
    path = run_dir(out, method, seed) / "run" / "version_0" / "metrics.csv"
    if not path.exists():
        return None
    run = build_run(f"{method} seed {seed}", path, read_rows(path))
    series = run.get(ACCURACY)
    if series is None:
        return None
    accuracy = dict(zip(series.steps, series.values))
    seconds = dict(zip(series.steps, series.seconds or (0.0,) * len(series.steps)))
    return RunResult(method, seed, accuracy, seconds)


def run_one(method: str, seed: int, steps: int, args: argparse.Namespace) -> RunResult:
    """Fit one (method, seed) unless a finished run is on disk; its result."""
    done = read_result(method, seed, args.out)
    if done is not None and max(done.accuracy) >= steps:
        return done
    log = run_dir(args.out, method, seed)
    log.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with open(log / "fit.log", "w") as f:
        proc = subprocess.run(fit_command(method, seed, steps, args), env=env, cwd=ROOT, stdout=f, stderr=f)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}): see {log / 'fit.log'}")
    result = read_result(method, seed, args.out)
    if result is None:
        raise RuntimeError(f"{method} seed {seed}: no {ACCURACY} in its metrics.csv ({log})")
    result.wall = time.perf_counter() - start
    return result


# ----- summaries ------------------------------------------------------------------------------------------------


def by_method(results: list[RunResult]) -> dict[str, dict[int, RunResult]]:
    """The results grouped by method, then by seed (methods in :data:`METHODS` order)."""
    grouped: dict[str, dict[int, RunResult]] = {}
    for method in METHODS:
        runs = {r.seed: r for r in results if r.method == method}
        if runs:
            grouped[method] = dict(sorted(runs.items()))
    return grouped


def common_steps(runs: dict[int, RunResult]) -> list[int]:
    """The steps every seed of one method was evaluated at."""
    return sorted(set.intersection(*(set(r.accuracy) for r in runs.values())))


def accuracy_within(run: RunResult, seconds: float) -> float:
    """The run's accuracy at its last evaluation whose training time is ``<= seconds`` (step 0 at worst)."""
    within = [s for s in run.accuracy if run.seconds[s] <= seconds + 1e-9]
    return run.accuracy[max(within)]


def per_method_table(grouped: dict[str, dict[int, RunResult]], only: list[int] | None = None) -> list[str]:
    """Markdown rows: mean accuracy and 95% t interval at each step (of ``only``, if given), and the mean training
    seconds there."""
    lines = ["| method | seeds | step | accuracy %, mean [95% t] | training s, mean |", "|---|---|---|---|---|"]
    for method, runs in grouped.items():
        for step in common_steps(runs):
            if only and step not in only:
                continue
            acc = t_interval([r.accuracy[step] for r in runs.values()])
            secs = t_interval([r.seconds[step] for r in runs.values()]).mean
            lines.append(f"| {method} | {len(runs)} | {step} | {acc.format()} | {secs:.0f} |")
    return lines


def difference_cells(diffs: list[float]) -> str:
    """``mean [t] / [bootstrap]`` of paired differences, in points, and how many seeds it favours."""
    t, boot = t_interval(diffs), bootstrap_interval(diffs)
    wins = sum(d > 0 for d in diffs)
    return f"{t.format()} | [{100 * boot.low:.1f}, {100 * boot.high:.1f}] | {wins}/{len(diffs)}"


def paired_table(grouped: dict[str, dict[int, RunResult]], baseline: str) -> list[str]:
    """Markdown rows: each method minus ``baseline`` by seed, at each common step and at equal training time."""
    header = [
        f"| method - {baseline} | when | difference, points, mean [95% t] | [95% bootstrap] | seeds ahead |",
        "|---|---|---|---|---|",
    ]
    lines = list(header)
    base = grouped.get(baseline, {})
    for method, runs in grouped.items():
        if method == baseline or not base:
            continue
        shared = sorted(set(runs) & set(base))
        if not shared:
            continue
        steps = sorted(set(common_steps(runs)) & set(common_steps({s: base[s] for s in shared})))
        for step in steps:
            diffs = paired_differences(
                {s: runs[s].accuracy[step] for s in shared}, {s: base[s].accuracy[step] for s in shared}
            )
            lines.append(f"| {method} | step {step} | {difference_cells(diffs)} |")
        last = max(steps) if steps else max(common_steps(runs))
        ours = {s: runs[s].accuracy[last] for s in shared}
        theirs = {s: accuracy_within(base[s], runs[s].seconds[last]) for s in shared}
        budget = t_interval([runs[s].seconds[last] for s in shared]).mean
        when = f"same training time as its step {last} (~{budget:.0f} s)"
        lines.append(f"| {method} | {when} | {difference_cells(paired_differences(ours, theirs))} |")
    return lines if len(lines) > len(header) else []


def write_markdown(grouped: dict[str, dict[int, RunResult]], args: argparse.Namespace, path: Path) -> None:
    """``results.md``: the settings, the per-method table and the paired differences."""
    walls = {m: [r.wall for r in runs.values() if r.wall is not None] for m, runs in grouped.items()}
    lines = [
        f"Held-out greedy accuracy on {args.num_val} questions; seeds {args.seeds}; {args.jobs} run(s) at a time, "
        f"{args.threads} torch thread(s) each; evaluations every {args.val_every} steps.\n",
        *per_method_table(grouped, args.table_steps),
        "",
        *paired_table(grouped, args.baseline),
        "",
        "Elapsed seconds per run (start-up and evaluations included), mean over the runs made by this invocation:",
        "",
        *(f"- {m}: {sum(w) / len(w):.0f} s ({len(w)} runs)" for m, w in walls.items() if w),
    ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(grouped: dict[str, dict[int, RunResult]], path: Path) -> None:
    """Mean accuracy with its 95% t band against steps (left) and against training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in grouped.items():
        steps = common_steps(runs)
        bands = [t_interval([r.accuracy[s] for r in runs.values()]) for s in steps]
        secs = [t_interval([r.seconds[s] for r in runs.values()]).mean for s in steps]
        for ax, x in ((by_step, steps), (by_time, secs)):
            plot_band(ax, x, bands, f"{method} (n={len(runs)})")
    by_step.set_xlabel("optimiser step")
    by_time.set_xlabel("training seconds (sum of timing/step)")
    by_time.set_xscale("symlog", linthresh=10)
    for ax in (by_step, by_time):
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.legend(fontsize=8)
    fig.suptitle("Embedded arithmetic task: mean and 95% t interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_band(ax: Axes, x: list, bands: list[Interval], label: str) -> None:
    """One method's mean line and 95% band on ``ax``."""
    line = ax.plot(x, [100 * b.mean for b in bands], marker="o", markersize=3, label=label)
    lows, highs = [100 * b.low for b in bands], [100 * b.high for b in bands]
    ax.fill_between(x, lows, highs, alpha=0.15, color=line[0].get_color())


def write_outputs(results: list[RunResult], args: argparse.Namespace) -> None:
    """``results.md``, ``results.png`` and ``runs.json`` for the runs finished so far."""
    grouped = by_method(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    write_markdown(grouped, args, args.out / "results.md")
    write_plot(grouped, args.out / "results.png")


def parse_method_steps(items: list[str], max_steps: int) -> dict[str, int]:
    """``METHOD=STEPS`` pairs over the default ``max_steps``; a clear error for a bad pair."""
    steps = dict.fromkeys(METHODS, max_steps)
    for item in items:
        method, _, value = item.rpartition("=")
        if method not in METHODS or not value.isdigit():
            raise SystemExit(f"--method-steps: expected METHOD=STEPS with METHOD one of {list(METHODS)}, got {item!r}")
        steps[method] = int(value)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--num-val", type=int, default=1000, help="held-out questions (the same for every run)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS)[:4], choices=list(METHODS))
    parser.add_argument("--method-steps", nargs="*", default=[], help="METHOD=STEPS overrides of --max-steps")
    parser.add_argument("--baseline", default="GRPO", choices=list(METHODS), help="the paired differences' base")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per run")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--table-steps", type=int, nargs="*", default=None, help="steps in the per-method table")
    parser.add_argument("--report-only", action="store_true", help="write the outputs of the runs on disk, run none")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    steps = parse_method_steps(args.method_steps, args.max_steps)
    jobs = [(m, s) for s in args.seeds for m in args.methods]  # seed-major: partial results stay balanced
    results = [r for m, s in jobs if (r := read_result(m, s, args.out)) and max(r.accuracy) >= steps[m]]
    todo = (
        [] if args.report_only else [(m, s) for m, s in jobs if not any(r.method == m and r.seed == s for r in results)]
    )
    print(f"{len(results)} runs on disk, {len(todo)} to run", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, m, s, steps[m], args) for m, s in todo]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            final = max(result.accuracy)
            print(
                f"{result.method:20s} seed {result.seed}: step {final} {100 * result.accuracy[final]:.1f}% "
                f"({result.seconds[final]:.0f} s training, {result.wall or 0:.0f} s elapsed)",
                flush=True,
            )
            write_outputs(results, args)  # partial results survive a stop
    write_outputs(results, args)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
