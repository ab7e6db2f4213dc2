"""Exercise the CUDA paths and print what was checked, with measured numbers.

    python benchmarks/gpu_check.py [--vocab 32000] [--tokens 1024]
    python benchmarks/gpu_check.py --cpu      # dry run of checks 1-3 and 5 on the CPU (to catch script errors first)

Checks, each printed as PASS/FAIL with its numbers:
1. bf16-mixed GCPO steps on the shipped tiny model (``tiny-arith``), step time;
2. a 4-bit NF4 reference on CUDA: 4-bit layer count, weight memory vs bf16, log-prob gap to bf16;
3. FSDP2 (``ModelParallelStrategy``) on one GPU with a 4-bit reference, bf16 all-gathers;
4. chunked log-probs: peak CUDA memory of one scoring forward+backward with and without ``logits_chunk_size`` on a
   large-vocabulary random Llama, and the largest log-prob difference;
5. the static KV cache (``StaticCacheLoop``): tokens/s of ``KVCacheLoop``, the static loop and the static loop
   compiled with CUDA graphs, on the shipped model and a random Llama of hidden 512 x 8 layers, 64 rows x
   ``--decode-tokens`` tokens; the compiled loop must give ``KVCacheLoop``'s greedy tokens (on ``--cpu``: not compiled).
   ``benchmarks/sampler_speed.py`` compares the samplers (HF generate and vLLM too) on real workloads.
Nothing is downloaded: models are the shipped one or random ones built here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import save_tiny_llama  # noqa: E402

from gcpo_lightning import (  # noqa: E402
    ArithmeticDataModule,
    CausalAdvantage,
    CausalProjectedKL,
    ColliderGraphBuilder,
    GCPOModule,
    GroupSampler,
)
from gcpo_lightning.components.sampling.backends import (  # noqa: E402
    Decoding,
    GenerationBackend,
    KVCacheLoop,
    StaticCacheLoop,
)
from gcpo_lightning.components.scoring.logprobs import score_completions  # noqa: E402
from gcpo_lightning.policy.builder import PolicyBuilder  # noqa: E402
from gcpo_lightning.policy.quantization import QuantizationConfig, count_4bit_linears, model_memory_bytes  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []
ACCELERATOR = "gpu"


def check(name: str) -> Callable:
    """Run the decorated function, record PASS with its message or FAIL with the error."""

    def wrap(fn: Callable[[], str]) -> Callable:
        start = time.perf_counter()
        try:
            RESULTS.append((name, True, f"{fn()} ({time.perf_counter() - start:.1f} s)"))
        except Exception as err:  # noqa: BLE001 - reported, the other checks still run
            traceback.print_exc()
            RESULTS.append((name, False, f"{type(err).__name__}: {err}"))
        return fn

    return wrap


def gcpo_module(**builder_kwargs) -> GCPOModule:
    return GCPOModule(
        policy_builder=PolicyBuilder("tiny-arith", **builder_kwargs),
        sampler=GroupSampler(max_completion_length=48),
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=1),
        adjuster=CausalAdvantage(),
        kl=CausalProjectedKL(max_ratio=10.0),
        num_generations=8,
        log_completions_every_n_steps=0,
    )


def fit(module: GCPOModule, steps: int = 3, **trainer_kwargs) -> tuple[L.Trainer, float]:
    trainer = L.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    start = time.perf_counter()
    trainer.fit(module, ArithmeticDataModule(batch_size=8, num_train=256, num_val=8))
    return trainer, (time.perf_counter() - start) / steps


def decode_rate(backend: GenerationBackend, model, ids, mask, d: Decoding, calls: int = 3) -> tuple[float, Tensor]:
    """Tokens per second of ``backend`` (median of ``calls`` after one warm-up call) and its last tokens."""
    rates = []
    for i in range(calls + 1):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = backend.generate(model, ids, mask, d)
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first call compiles (and captures the CUDA graph)
            rates.append(tokens.numel() / (time.perf_counter() - start))
    return statistics.median(rates), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=1024, help="completion tokens per row in check 4")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens per row in check 5")
    parser.add_argument("--cpu", action="store_true", help="dry run of checks 1-3 and 5 on the CPU")
    args = parser.parse_args()
    global ACCELERATOR
    ACCELERATOR = "cpu" if args.cpu else "gpu"
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to check (the CPU paths are covered by the test suite; --cpu dry-runs this)")
    print(f"device: {torch.cuda.get_device_name() if not args.cpu else 'cpu (dry run)'}, torch {torch.__version__}")
    tmp = Path(tempfile.mkdtemp())

    @check("bf16-mixed GCPO steps")
    def _() -> str:
        trainer, per_step = fit(gcpo_module(), precision="bf16-mixed")
        loss = float(trainer.logged_metrics["loss"])
        assert torch.isfinite(torch.tensor(loss))
        return f"loss {loss:.4f}, {per_step:.2f} s/step"

    @check("4-bit NF4 reference on CUDA")
    def _() -> str:
        path = save_tiny_llama(tmp / "mid", hidden=512, layers=4)
        from gcpo_lightning.policy.loading import load_causal_lm
        from gcpo_lightning.policy.quantization import load_quantized

        full = load_causal_lm(str(path), {"dtype": "bfloat16"}).to(device).eval()
        q4 = load_quantized(
            str(path), {"dtype": "bfloat16"}, QuantizationConfig(compute_dtype="bfloat16"), device=device
        ).eval()
        ids = torch.randint(3, 30, (8, 64), device=device)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            a = score_completions(full, ids[:, :16], mask[:, :16], ids[:, 16:], mask[:, 16:]).logps
            b = score_completions(q4, ids[:, :16], mask[:, :16], ids[:, 16:], mask[:, 16:]).logps
        gap = (a - b).abs().mean().item()
        return (
            f"{count_4bit_linears(q4)} 4-bit linears, weights {model_memory_bytes(q4) / 2**20:.1f} MiB vs bf16 "
            f"{model_memory_bytes(full) / 2**20:.1f} MiB, mean |dlogp| {gap:.4f}"
        )

    @check("FSDP2 on one GPU + 4-bit reference")
    def _() -> str:
        from lightning.pytorch.strategies import ModelParallelStrategy

        module = gcpo_module(fsdp_param_dtype="bfloat16", reference_quantization=QuantizationConfig())
        trainer, per_step = fit(module, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
        sharded = any(type(p).__name__ == "DTensor" for p in module.policy.parameters())
        assert sharded and torch.isfinite(trainer.logged_metrics["loss"])
        return f"policy sharded (DTensor), loss {float(trainer.logged_metrics['loss']):.4f}, {per_step:.2f} s/step"

    @check("chunked log-probs memory")
    def _() -> str:
        if args.cpu:
            return "skipped on CPU (benchmarks/logprob_memory.py measures it there)"
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
        )
        model = LlamaForCausalLM(config).cuda()
        n, p, t = 8, 64, args.tokens
        prompt = torch.randint(0, args.vocab, (n, p), device="cuda")
        comp = torch.randint(0, args.vocab, (n, t), device="cuda")
        peaks, logps = {}, {}
        for chunk in (None, 1):
            model.zero_grad()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            scores = score_completions(
                model, prompt, torch.ones_like(prompt), comp, torch.ones_like(comp), logits_chunk_size=chunk
            )
            scores.logps.mean().backward()
            peaks[chunk] = (torch.cuda.max_memory_allocated() - base) / 2**20
            logps[chunk] = scores.logps.detach()
        diff = (logps[None] - logps[1]).abs().max().item()
        assert diff < 1e-3
        return (
            f"vocab {args.vocab}, {n}x{t} tokens: peak {peaks[None]:.0f} MiB unchunked vs {peaks[1]:.0f} MiB "
            f"chunked, max |dlogp| {diff:.2e}"
        )

    @check("static KV cache, compiled decode step")
    def _() -> str:
        from gcpo_lightning.policy.loading import ASSETS, load_causal_lm, load_tokenizer

        tok = load_tokenizer(str(ASSETS / "tiny-arith"))
        ids = tok(["Problem: 3+4-5+2+8\nSolution:"] * 64, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids.to(device)
        T = args.decode_tokens
        d = Decoding(T, [tok.eos_token_id], tok.pad_token_id, 1.0, 1.0, 0, greedy=True, min_new_tokens=T)
        backends = {"KVCacheLoop": KVCacheLoop(), "static": StaticCacheLoop(compile=False)}
        if not args.cpu:
            backends["static+compile"] = StaticCacheLoop(compile=True)
        lines = []
        for name, path in (
            ("tiny-arith", ASSETS / "tiny-arith"),
            ("llama 512x8", save_tiny_llama(tmp / "dec", 0, 512, 8)),
        ):
            model = load_causal_lm(str(path)).to(device).eval()
            rates, tokens = {}, {}
            for label, backend in backends.items():
                rates[label], tokens[label] = decode_rate(backend, model, ids, torch.ones_like(ids), d)
            assert all(torch.equal(t, tokens["KVCacheLoop"]) for t in tokens.values()), f"{name}: tokens differ"
            lines.append(f"{name}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates.items()))
        return f"64 x {T} tokens, same greedy tokens; " + "; ".join(lines)

    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}: {msg}" for name, ok, msg in RESULTS))
    sys.exit(0 if all(ok for _, ok, _ in RESULTS) else 1)


if __name__ == "__main__":
    main()
