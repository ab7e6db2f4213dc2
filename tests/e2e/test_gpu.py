"""CUDA paths: bf16 autocast, a 4-bit reference on the GPU, FSDP2 on one GPU, the static KV cache's decode step
compiled with CUDA graphs. Skipped cleanly without CUDA.

``benchmarks/gpu_check.py`` runs the same paths at a larger size and prints measured memory and timings.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gcpo_lightning import ArithmeticDataModule
from gcpo_lightning.components.sampling.backends import Decoding, KVCacheLoop, StaticCacheLoop
from gcpo_lightning.policy.loading import ASSETS, load_causal_lm, load_tokenizer
from gcpo_lightning.policy.quantization import QuantizationConfig, count_4bit_linears

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def fit_on_gpu(module, **trainer_kwargs) -> L.Trainer:
    module.log_completions_every_n_steps = 0
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, ArithmeticDataModule(batch_size=2, num_train=16, num_val=2))
    return trainer


class PolicyDevice(L.Callback):
    """The policy's device during training (Lightning moves the module back to the CPU when ``fit`` ends)."""

    device: torch.device | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.device = next(pl_module.policy.parameters()).device


def test_bf16_mixed_on_cuda(make_module, tiny_model_dir):
    module, seen = make_module(tiny_model_dir), PolicyDevice()
    trainer = fit_on_gpu(module, precision="bf16-mixed", callbacks=[seen])
    assert torch.isfinite(trainer.logged_metrics["loss"]) and seen.device is not None and seen.device.type == "cuda"
    assert trainer.logged_metrics["memory/cuda_peak_gib"] > 0  # the step's high-water mark, logged on CUDA only


def test_4bit_reference_on_cuda(make_module, tiny_model_dir):
    module = make_module(tiny_model_dir, reference_quantization=QuantizationConfig(compute_dtype="bfloat16"))
    trainer = fit_on_gpu(module, precision="bf16-mixed")
    assert count_4bit_linears(module.reference) > 0 and next(module.reference.parameters()).is_cuda
    assert torch.isfinite(trainer.logged_metrics["kl"])


def test_fsdp2_on_one_gpu(make_module, tiny_model_dir):
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = make_module(
        tiny_model_dir, fsdp_param_dtype="bfloat16", reference_quantization=QuantizationConfig(compute_dtype="bfloat16")
    )
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = fit_on_gpu(module, strategy=strategy)
    assert any(type(p).__name__ == "DTensor" for p in module.policy.parameters())
    assert torch.isfinite(trainer.logged_metrics["loss"])


@pytest.mark.parametrize("greedy", [True, False])
def test_static_cache_compiled_with_cuda_graphs_gives_the_loops_tokens(greedy):
    """``StaticCacheLoop``'s step compiled by inductor with CUDA graphs (``compile: auto`` on CUDA) gives
    ``KVCacheLoop``'s tokens, greedy and with the same seed, on the shipped model (EOS after solutions of different
    lengths), also for a second, smaller call that reuses the cache and the captured graph."""
    from torch._dynamo.utils import counters

    model, tok = load_causal_lm(str(ASSETS / "tiny-arith")).cuda().eval(), load_tokenizer(str(ASSETS / "tiny-arith"))
    prompts = ["Problem: 1+2\nSolution:", "Problem: 3+4-5+2+8\nSolution:", "Problem: 9-1\nSolution:"] * 8
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
    d = Decoding(
        max_new_tokens=48,
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        greedy=greedy,
        min_new_tokens=0,
    )
    static = StaticCacheLoop()
    assert static.compiles(model)
    counters.clear()
    for rows in (24, 10):
        ids, mask = enc["input_ids"][:rows], enc["attention_mask"][:rows]
        runs = []
        for backend in (KVCacheLoop(), static):
            torch.manual_seed(0)
            runs.append(backend.generate(model, ids, mask, d))
        assert torch.equal(runs[0], runs[1]), rows
    assert static._buffers.rows == 24 and not counters["inductor"]["cudagraph_skips"]
