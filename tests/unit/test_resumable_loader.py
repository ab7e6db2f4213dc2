"""The data position and the random streams that exact resume restores, without a model: the resumable sampler and
loader, and the RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gcpo_lightning.data.loader import ResumableLoader, ResumableSampler
from gcpo_lightning.training.rng import rng_state, set_rng_state


def test_sampler_resumes_mid_epoch_in_the_same_order():
    data = list(range(10))
    sampler = ResumableSampler(data, seed=3)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == data and order != list(range(10))
    it = iter(sampler)
    seen = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["consumed"] == 4 and state["epoch"] == 1
    fresh = ResumableSampler(data, seed=3)
    fresh.load_state_dict(state)
    fresh.set_epoch(1)
    assert seen + list(fresh) == order  # the rest of the same epoch, nothing repeated
    fresh.set_epoch(2)
    assert sorted(fresh) == data and list(fresh) != order  # next epoch: a new order, from the start


def test_loader_position_counts_whole_batches():
    loader = ResumableLoader(list(range(12)), batch_size=4, shuffle=True, seed=0, collate_fn=list)
    it = iter(loader)
    next(it)
    assert loader.state_dict()["consumed"] == 4  # no worker has prefetched ahead of the batches trained on


def test_sampler_refuses_a_different_world_size():
    state = ResumableSampler(list(range(4))).state_dict()
    state["num_replicas"] = 2
    with pytest.raises(ValueError, match="2 data-parallel ranks"):
        ResumableSampler(list(range(4))).load_state_dict(state)


def test_rng_state_round_trip():
    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
