"""GCPO's step-time overhead over GRPO on the embedded default, for several (G, M, K) settings.

    python benchmarks/gcpo_overhead.py --steps 4 --settings 8,2,1 8,1,1 4,2,1 4,4,4 --prompts 8

Each setting runs ``configs/gcpo.yaml`` (and GRPO runs ``configs/grpo.yaml``) for ``--steps`` steps in its own
process, without validation; the first step is a warm-up and is dropped. Prints the mean step time (the sum of
the logged ``timing/*`` phases that make up a step), its ratio to GRPO's, and the mean time of each phase.
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


def run(config: str, steps: int, prompts: int, extra: list[str]) -> dict[str, float]:
    """Mean seconds per phase over the steps after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gcpo_lightning", "fit", "--config", config, f"--trainer.max_steps={steps}",
               "--trainer.num_sanity_val_steps=0", "--trainer.val_check_interval=100000",
               "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp}",
               "--trainer.logger.name=run", "--trainer.logger.version=0", f"--data.init_args.batch_size={prompts}",
               *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rows = [r for r in csv.DictReader(open(Path(tmp) / "run" / "version_0" / "metrics.csv")) if r.get("timing/update")]
    rows = rows[1:] or rows
    keys = [f"timing/{p}" for p in STEP_PHASES + GRAPH_PHASES]
    out = {k.split("/")[1]: statistics.mean(float(r[k]) for r in rows) for k in keys if rows[0].get(k)}
    out["step"] = sum(v for k, v in out.items() if k in STEP_PHASES)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--settings", nargs="+", default=["8,2,1", "8,1,1", "4,2,1", "4,4,4"], help="G,M,K")
    parser.add_argument("--policy-context", default="context", choices=["context", "query"])
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.prompts} prompts/step")
    header = f"{'method':28s} {'step s':>7s} {'x GRPO':>7s}  phases (s)"
    print(header)
    baselines: dict[int, float] = {}
    for setting in args.settings:
        G, M, K = (int(x) for x in setting.split(","))
        if G not in baselines:
            grpo = run("configs/grpo.yaml", args.steps, args.prompts, [f"--model.num_generations={G}"])
            baselines[G] = grpo["step"]
            print(f"{f'GRPO G={G}':28s} {grpo['step']:7.2f} {1.0:7.2f}  {fmt(grpo)}", flush=True)
        gcpo = run("configs/gcpo.yaml", args.steps, args.prompts, [
            f"--model.num_generations={G}", f"--model.graph_builder.init_args.num_integrated={M}",
            f"--model.graph_builder.init_args.num_context_samples={K}",
            f"--model.kl.init_args.policy_context={args.policy_context}"])
        print(f"{f'GCPO G={G} M={M} K={K}':28s} {gcpo['step']:7.2f} {gcpo['step'] / baselines[G]:7.2f}  {fmt(gcpo)}",
              flush=True)


def fmt(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in phases.items() if k != "step")


if __name__ == "__main__":
    main()
