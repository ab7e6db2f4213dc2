"""GRPO vs GCPO vs the paper's two ablations on the embedded task, over several seeds.

    python benchmarks/compare_methods.py --seeds 0 1 2 --max-steps 60 --val-every 20 --out runs/compare

Each (method, seed) is one ``python -m gcpo_lightning fit`` run of the method's config (sequential, one process
each, so a crash is contained and timings are clean). Held-out greedy accuracy is read from each run's
``metrics.csv`` (step 0 is the baseline logged by the sanity check). Writes ``results.md`` (mean, std, min, max
over seeds at every evaluated step, plus wall time per run) and ``results.png`` (mean with a min-max band) into
``--out``. Copy them to ``docs/`` by hand after reading them.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "GRPO": "configs/grpo.yaml",
    "GCPO": "configs/gcpo.yaml",
    "GCPO w/o weighting": "configs/gcpo_no_weighting.yaml",
    "GCPO w/o causal KL": "configs/gcpo_no_causal_kl.yaml",
}


def run_one(config: str, seed: int, args: argparse.Namespace, log_dir: Path) -> tuple[dict[int, float], float]:
    """Fit one config with one seed; return held-out accuracy by step and the wall time."""
    cmd = [
        sys.executable,
        "-m",
        "gcpo_lightning",
        "fit",
        "--config",
        config,
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--trainer.max_steps={args.max_steps}",
        f"--trainer.val_check_interval={args.val_every}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={log_dir}",
        "--trainer.logger.name=run",
        "--trainer.logger.version=0",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    accuracy: dict[int, float] = {}
    with open(log_dir / "run" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/accuracy"):
                accuracy[int(row["step"])] = float(row["val/accuracy"])
    return accuracy, wall


def summarise(runs: dict[str, list[dict[int, float]]]) -> dict[str, dict[int, tuple[float, float, float, float]]]:
    """Per method and step: (mean, std, min, max) over seeds."""
    out: dict[str, dict[int, tuple[float, float, float, float]]] = {}
    for method, per_seed in runs.items():
        steps = sorted(set.intersection(*(set(r) for r in per_seed)))
        out[method] = {}
        for s in steps:
            vals = [r[s] for r in per_seed]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[method][s] = (statistics.mean(vals), std, min(vals), max(vals))
    return out


def write_table(summary: dict, walls: dict[str, list[float]], seeds: list[int], path: Path) -> None:
    """A markdown table: accuracy (mean +- std [min, max]) per method and step, and mean wall time per run."""
    steps = sorted({s for per in summary.values() for s in per})
    lines = [
        f"Held-out greedy accuracy (%) over seeds {seeds}: mean ± std [min, max]\n",
        "| method | " + " | ".join(f"step {s}" for s in steps) + " | wall time / run |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for method, per in summary.items():
        cells = [
            f"{100 * m:.1f} ± {100 * sd:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"
            for m, sd, lo, hi in (per[s] for s in steps)
        ]
        lines.append(
            f"| {method} (n={len(walls[method])}) | "
            + " | ".join(cells)
            + f" | {statistics.mean(walls[method]):.0f} s |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(summary: dict, path: Path) -> None:
    """Mean accuracy against steps with a min-max band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, per in summary.items():
        steps = sorted(per)
        mean = [100 * per[s][0] for s in steps]
        ax.plot(steps, mean, marker="o", label=method)
        ax.fill_between(steps, [100 * per[s][2] for s in steps], [100 * per[s][3] for s in steps], alpha=0.15)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title("Embedded arithmetic task: mean and min-max over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--val-every", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[int, float]]] = {m: [] for m in args.methods}
    walls: dict[str, list[float]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            log_dir = args.out / method.replace(" ", "_").replace("/", "") / f"seed{seed}"
            acc, wall = run_one(METHODS[method], seed, args, log_dir)
            runs[method].append(acc)
            walls[method].append(wall)
            print(f"{method:22s} seed {seed}: {acc}  ({wall:.0f} s)", flush=True)
            write_outputs({m: r for m, r in runs.items() if r}, walls, args)  # partial results survive a stop
    print((args.out / "results.md").read_text())


def write_outputs(
    runs: dict[str, list[dict[int, float]]], walls: dict[str, list[float]], args: argparse.Namespace
) -> None:
    """Write the table and the plot for the runs finished so far."""
    summary = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for s in args.seeds})
    write_table(summary, walls, seeds, args.out / "results.md")
    write_plot(summary, args.out / "results.png")


if __name__ == "__main__":
    main()
