"""Several ranks: one vLLM engine per rank (``external_launcher``), GCPO fitted on CPU with two gloo processes.

Each run is ``tests/support/distributed_fit.py --vllm`` in a subprocess (Lightning relaunches the command line for
rank 1). After the fit every rank samples its own prompts with its engine and compares the engine's log-probs of
those samples with the trained policy's and with the initial model's: the engine must hold the trained weights
(pushed after every optimiser step; under FSDP2 gathered from the shards), not the ones it was built with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_ARITH = Path(__file__).parents[2] / "gcpo_lightning" / "assets" / "tiny-arith"  # head size 32, as vLLM's CPU wants
SETUPS = {
    "fsdp2": (),  # ModelParallelStrategy: the policy sharded over the two ranks
    "fsdp2_lora": ("--lora",),  # adapters on an FSDP2-sharded base: merged weights pushed
}


@pytest.fixture(scope="module", params=sorted(SETUPS))
def fitted(request, run_fit, tmp_path_factory) -> tuple[str, Path]:
    """A 2-step GCPO fit with ``VLLMSampler`` on two ranks (validation at step 2)."""
    out = tmp_path_factory.mktemp(f"vllm_{request.param}")
    return request.param, run_fit(TINY_ARITH, out, "--vllm", "--max-steps", "2", *SETUPS[request.param])


def test_every_rank_samples_its_prompts_with_an_engine_holding_the_trained_weights(fitted, fit_metrics) -> None:
    _, out = fitted
    ranks = [fit_metrics(out, r) for r in (0, 1)]
    assert [m["sharded"] for m in ranks] == [True, True]  # (GCPOModule runs several ranks under FSDP2 only)
    prompts = [m["vllm"]["prompts"] for m in ranks]
    assert prompts[0] != prompts[1]  # each rank generates its own prompts
    for m in ranks:
        engine = m["vllm"]
        assert [row["step"] for row in m["rows"]] == [1, 2]
        # built at step 1, pushed before step 2's rollout and before the validation after it
        assert engine["pushes_during_fit"] == 2
        assert engine["max_abs_logp_diff_trained"] < 1e-4  # the engine's log-probs are the trained policy's
        # and not those of the weights it was built from: at least 100 times further from them (2 LoRA steps on the
        # shipped model move the log-probs by ~0.06 nats, full fine-tuning by ~15)
        assert engine["max_abs_logp_diff_initial"] > 100 * max(engine["max_abs_logp_diff_trained"], 1e-5)
        logged = [row["sampling/sampling_logp_difference/max"] for row in m["rows"]]
        assert max(logged) < 1e-4  # during the fit too: every rollout scored against the engine's log-probs
