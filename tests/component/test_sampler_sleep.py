"""Sleep mode between generation and the update: what ``VLLMSampler`` asks of its engine, in which order, and where
``GCPOModule`` puts the engine to sleep in a training step.

vLLM's sleep mode is CUDA-only, so the engine here is a recording stand-in with ``vllm.LLM``'s methods; the real
engine's sleep and wake are exercised by ``tests/vllm_engine/test_vllm_sleep_cuda.py`` on a CUDA machine with vLLM.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from gcpo_lightning import CausalProjectedKL, ColliderGraphBuilder, GroupSampler
from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler, fingerprint


class RecordingEngine:
    """The ``vllm.LLM`` methods the sampler calls around sleep, recorded as ``(name, argument)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags or ())))

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        names = tuple(name for name, _ in kwargs["weights_iterator"])
        self.calls.append((method, names))

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", None))


def engine_sampler(sleep_level: int, policy: nn.Module) -> tuple[VLLMSampler, RecordingEngine]:
    """A sampler whose engine (the stand-in) holds ``policy``'s current weights, as after its first ``sample``."""
    sampler = VLLMSampler()  # built at level 0, then set: the CUDA check in __init__ is for real engines
    sampler.sleep_level = sleep_level
    engine = RecordingEngine()
    sampler.llm, sampler._synced = engine, fingerprint(policy)
    return sampler, engine


def test_level_2_wakes_the_weights_pushes_them_then_wakes_the_kv_cache():
    policy = nn.Linear(2, 2)
    sampler, engine = engine_sampler(2, policy)
    sampler.sleep()
    sampler.sleep()  # already asleep: no second call
    assert engine.calls == [("sleep", 2)] and sampler.sleeping
    sampler.ensure_synced(policy)  # unchanged weights, but level 2 discarded them: pushed anyway
    assert engine.calls[1:] == [
        ("wake_up", ("weights",)),
        ("reload_weights", ("weight", "bias")),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache", None),  # once, after the KV cache is back
    ]
    assert not sampler.sleeping and sampler.weight_pushes == 1


def test_level_1_pushes_only_weights_that_changed_while_asleep():
    policy = nn.Linear(2, 2)
    sampler, engine = engine_sampler(1, policy)
    sampler.sleep()
    sampler.ensure_synced(policy)  # level 1 kept the weights and they did not change: no push
    assert engine.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache", None),
    ]
    engine.calls.clear()
    sampler.sleep()
    with torch.no_grad():
        policy.weight.add_(1.0)  # an optimiser step while the engine sleeps
    sampler.ensure_synced(policy)
    assert [name for name, _ in engine.calls] == [
        "sleep",
        "wake_up",
        "reload_weights",
        "wake_up",
        "reset_prefix_cache",
    ]
    assert sampler.weight_pushes == 1


def test_sleep_level_0_never_sleeps_and_bad_levels_are_refused():
    policy = nn.Linear(2, 2)
    sampler, engine = engine_sampler(0, policy)
    sampler.sleep()
    assert engine.calls == [] and not sampler.sleeping
    with pytest.raises(ValueError, match="sleep_level must be 0"):
        VLLMSampler(sleep_level=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_sleep_mode_without_cuda_is_refused_when_the_sampler_is_made():
    with pytest.raises(ValueError, match="sleep_level=2 needs CUDA"):
        VLLMSampler(sleep_level=2)  # from the config, before the policy (or vLLM) is loaded


class RecordingSampler(GroupSampler):
    """A ``GroupSampler`` that records its generation calls and the module's ``sleep`` calls in ``events``."""

    def __init__(self, events: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.events = events

    def sample(self, *args, **kwargs):
        self.events.append("sample")
        return super().sample(*args, **kwargs)

    def sample_shared(self, *args, **kwargs):
        self.events.append("sample")
        return super().sample_shared(*args, **kwargs)

    def sleep(self) -> None:
        self.events.append("sleep")


class RecordBackward(L.Callback):
    def __init__(self, events: list[str]) -> None:
        self.events = events

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.events.append("backward")


def test_the_module_puts_the_sampler_to_sleep_after_the_causal_phases_and_before_the_update(
    make_module, tiny_model_dir, tmp_path
):
    L.seed_everything(0)
    events: list[str] = []
    module = make_module(
        tiny_model_dir,
        sampler=RecordingSampler(events, max_completion_length=8),
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=1),
        kl=CausalProjectedKL(),
        num_generations=3,
    )
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        default_root_dir=tmp_path,  # completions.jsonl goes here without a logger
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordBackward(events)],
    )
    from gcpo_lightning import ArithmeticDataModule

    trainer.fit(module, ArithmeticDataModule(batch_size=2, num_train=16, num_val=2, val_batch_size=2))
    assert events.count("sleep") == 2  # once per step
    for i, event in enumerate(events):
        if event == "sleep":
            # the rollout, the integrated outputs and the contexts were generated; the update comes next
            assert events[i - 3 : i] == ["sample"] * 3 and events[i + 1] == "backward"
        if event == "backward":
            assert events[i - 1] in ("sleep", "backward")
