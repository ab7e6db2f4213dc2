"""CUDA paths: bf16 autocast, a 4-bit reference on the GPU, FSDP2 on one GPU. Skipped cleanly without CUDA.

``benchmarks/gpu_check.py`` runs the same paths at a larger size and prints measured memory and timings.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gcpo_lightning import ArithmeticDataModule
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


def test_bf16_mixed_on_cuda(make_module, tiny_model_dir):
    module = make_module(tiny_model_dir)
    trainer = fit_on_gpu(module, precision="bf16-mixed")
    assert torch.isfinite(trainer.logged_metrics["loss"]) and next(module.policy.parameters()).is_cuda


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
