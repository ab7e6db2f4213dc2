"""FSDP2 (Lightning's ModelParallelStrategy) on CPU with two gloo processes: GCPO steps, rewards gathered across
ranks, a sharded checkpoint, exact resume and the Hugging Face export.

Each run is ``tests/support/distributed_fit.py`` in a subprocess (the ``run_fit`` fixture of ``tests/conftest.py``):
Lightning relaunches the command line for rank 1, so it must never run inside the pytest process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gcpo_lightning import CausalAdvantage
from gcpo_lightning.interfaces.containers import CausalGraph

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def runs(run_fit, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 4-step run, and a run checkpointed at step 2 then resumed to step 4."""
    root = tmp_path_factory.mktemp("fsdp")
    full = run_fit(tiny_model_dir, root / "full", "--max-steps", "4")
    first = run_fit(tiny_model_dir, root / "first", "--max-steps", "2", "--save-at", "2")
    resumed = run_fit(
        tiny_model_dir, root / "resumed", "--max-steps", "4", "--resume", str(first / "ckpt" / "step=2.ckpt")
    )
    return {"full": full, "first": first, "resumed": resumed}


@pytest.mark.slow(seconds=80)  # the first user of `runs`: its three fits
def test_policy_is_sharded_and_checkpoint_is_distributed(fit_metrics, runs):
    assert fit_metrics(runs["full"])["sharded"] and fit_metrics(runs["full"], 1)["sharded"]
    ckpt = runs["first"] / "ckpt" / "step=2.ckpt"
    assert ckpt.is_dir()  # one shard file per rank plus Lightning's metadata, no reference weights
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    assert len(meta["gcpo_rng_states"]) == 2 and "combined_loader" in meta["loops"]["fit_loop"]["state_dict"]


@pytest.mark.slow
def test_evaluation_under_fsdp_is_synced_across_ranks(fit_metrics, runs):
    val = fit_metrics(runs["full"])["val"]
    assert {"val/accuracy", "val/pass@1", "val/pass@2", "val/mean@2", "val/reward"} <= val.keys()
    assert fit_metrics(runs["full"], 1)["val"] == val  # every rank computes the same, global numbers


@pytest.mark.slow
def test_rewards_are_gathered_and_groups_stay_on_their_rank(runs):
    ranks = [torch.load(runs["full"] / f"rank{r}_step1.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank trains on its own prompts
    everything = torch.cat([ranks[0]["rewards"], ranks[1]["rewards"]])
    for rank in ranks:
        assert torch.equal(rank["batch_rewards"], everything)
    # the advantages (scale_rewards="batch") equal one process computing over both ranks' groups at once
    graph = CausalGraph(
        group_size=4,
        representations=torch.cat([r["z"] for r in ranks]),
        context_representations=torch.cat([r["context_z"] for r in ranks]),
    )
    rollout = type("R", (), {"group_size": 4})()
    joint = CausalAdvantage(alpha=2.0, scale_rewards="batch").adjust(everything, rollout, graph).values
    torch.testing.assert_close(torch.cat([r["advantages"] for r in ranks]), joint)


@pytest.mark.slow
def test_rollouts_see_full_weights_and_a_version_that_moves_with_every_step(runs):
    """What VLLMSampler pushes under FSDP2: inside the rollout's full_parameters every rank reads the full weights
    (the same on both ranks, shaped as the exported state dict), and parameter_version, read from the shards,
    changes after every optimiser step (the gathered copies' own version counters do not)."""
    final = torch.load(runs["full"] / "weights.pt")
    steps = [[torch.load(runs["full"] / f"rank{r}_step{s}.pt", weights_only=False) for r in (0, 1)] for s in range(4)]
    for ranks in steps:
        a, b = (r["gathered"] for r in ranks)
        assert a.keys() == final.keys() and all(a[k].shape == final[k].shape for k in final)
        assert all(torch.equal(a[k], b[k]) for k in a)  # full tensors, not each rank's shard
        assert ranks[0]["parameter_version"] == ranks[1]["parameter_version"]
    versions = [ranks[0]["parameter_version"] for ranks in steps]
    assert all(later > earlier for earlier, later in zip(versions, versions[1:])), versions
    first, second = steps[0][0]["gathered"], steps[1][0]["gathered"]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the step changed the weights read


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_is_exact(fit_metrics, runs):
    full, resumed = fit_metrics(runs["full"])["rows"], fit_metrics(runs["resumed"])["rows"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed == full[2:]  # every logged metric of steps 3 and 4, bit for bit
    assert fit_metrics(runs["resumed"])["val"] == fit_metrics(runs["full"])["val"]  # and the final evaluation
    a = torch.load(runs["full"] / "weights.pt")
    b = torch.load(runs["resumed"] / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_export_from_sharded_policy_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["full"] / "hf")
    weights = torch.load(runs["full"] / "weights.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.slow
def test_fsdp2_with_a_4bit_reference_and_bf16_all_gathers(run_fit, fit_metrics, tiny_model_dir, tmp_path):
    # also micro_batch_tokens: the ranks' contexts differ in length, and both must run as many passes (FSDP2)
    out = run_fit(
        tiny_model_dir,
        tmp_path / "q4",
        *("--max-steps", "2", "--reference-4bit", "--fsdp-param-dtype", "bfloat16", "--micro-batch-tokens", "200"),
    )
    summary = fit_metrics(out)
    assert summary["sharded"] and summary["reference_4bit"]
    assert all(r["kl"] >= 0 for r in summary["rows"]) and summary["rows"][-1]["kl"] > 0
    assert all(1 <= r["update/micro_batch_rows"] < 4 for r in summary["rows"])  # the budget, not micro_batch_size


@pytest.mark.slow
def test_fsdp2_with_lora_trains_adapters_and_exports_merged(run_fit, fit_metrics, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_fit(tiny_model_dir, tmp_path / "lora", "--max-steps", "2", "--lora")
    summary = fit_metrics(out)
    assert summary["sharded"] and summary["trainable"] and all("lora_" in n for n in summary["trainable"])
    kls = [r["kl"] for r in summary["rows"]]
    assert kls[0] == 0 and kls[-1] > 0  # B = 0 at the start: the policy is its reference; then it moves away
    merged = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted projections differ from the base


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("ddp", "DDPStrategy is not supported; use lightning.pytorch.strategies.ModelParallelStrategy"),
        ("tp", "needs tensor_parallel_size=1"),
    ],
)
def test_unsupported_strategies_are_refused_before_loading(strategy, message):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from gcpo_lightning.training.distributed import check_strategy

    cpus = [torch.device("cpu")] * 2
    made = (
        DDPStrategy(parallel_devices=cpus)
        if strategy == "ddp"
        else ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    )
    made.parallel_devices = cpus
    with pytest.raises(ValueError, match=message):
        check_strategy(made)
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))  # FSDP only: accepted


def _token_mean_step(model_dir: str, rollout, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients of one real ``optimisation_step`` of a ``GCPOModule`` (DAPO's ``TokenMean``, no KL, no clipping).

    Only what needs a Trainer is stubbed: the optimiser (its ``step`` records the gradients it would apply) and
    ``manual_backward``. On two gloo ranks the step scales the loss by ``rank_share`` itself.
    """
    from gcpo_lightning import GCPOModule, GroupSampler, ReferenceKL
    from gcpo_lightning.components.aggregation import TokenMean
    from gcpo_lightning.policy.builder import PolicyBuilder
    from gcpo_lightning.training.update import optimisation_step

    module = GCPOModule(
        policy_builder=PolicyBuilder(model_dir),
        reward_funcs=[lambda completions, **_: [0.0]],
        sampler=GroupSampler(max_completion_length=8),
        kl=ReferenceKL(beta=0.0),
        loss=TokenMean(),
        num_generations=2,
        max_grad_norm=None,
    )
    module.configure_model()
    applied: dict[str, torch.Tensor] = {}

    class RecordingOptimizer:
        def zero_grad(self, set_to_none: bool = True) -> None:
            module.policy.zero_grad(set_to_none=set_to_none)

        def step(self) -> None:
            applied.update({n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None})

    module.optimizers = RecordingOptimizer
    module.lr_schedulers = lambda: None
    module.manual_backward = lambda loss: loss.backward()
    models = module.models()
    optimisation_step(module, rollout, advantages, module.kl.prepare(rollout, None, models), models)
    return applied


def _dapo_rank(rank: int, model_dir: str, halves: list, port: int, out: str) -> None:
    """One gloo rank: the module's optimisation step on its own group, then gradients averaged (as FSDP does)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rollout, advantages = halves[rank]
    grads = _token_mean_step(model_dir, rollout, advantages)
    for name in sorted(grads):
        dist.all_reduce(grads[name])
        grads[name] /= 2  # data parallel: the mean of the ranks' gradients
    torch.save(grads, f"{out}/grad{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_dapo_token_mean_is_global_across_ranks(tiny_model_dir, tmp_path):
    """Two ranks running the module's own step give the gradient of one process over both ranks' tokens.

    Rank 0 holds group 0 with 1 + 2 = 3 completion tokens, rank 1 group 1 with 4 + 5 = 9: the step's token mean
    weighs every one of the 12 tokens 1/12. Averaging the ranks' own token means instead weighs rank 0's tokens
    1/6 and rank 1's 1/18, a different gradient (checked too, so the test can tell the two apart).
    """
    import socket

    from gcpo_lightning import GroupSampler
    from gcpo_lightning.interfaces.containers import PolicyModels
    from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer

    model = str(tiny_model_dir)
    torch.manual_seed(0)
    models = PolicyModels(load_causal_lm(model), load_tokenizer(model))
    prompts = ["Problem: 1+2\nSolution:", "Problem: 3+4\nSolution:"]
    rollout = GroupSampler(max_completion_length=8).sample(models, prompts, 2)
    T = rollout.completion_ids.shape[1]
    assert T >= 5, "every completion stopped before 5 tokens: pick another seed"
    lengths = torch.tensor([1, 2, 4, 5])
    rollout.completion_mask = (torch.arange(T) < lengths[:, None]).to(rollout.completion_mask.dtype)
    rollout.old_logps = None  # on-policy: the ratio is 1, its gradient the log-prob's
    advantages = torch.tensor([1.0, -0.5, 0.75, -1.25])
    group = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    halves = [(rollout.select(g), advantages[g]) for g in group]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_dapo_rank, args=(model, halves, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1)]

    joint = _token_mean_step(model, rollout, advantages)  # one process, all 12 tokens
    per_rank_means = [_token_mean_step(model, *half) for half in halves]  # each rank's own token mean
    assert joint.keys() == ranks[0].keys() == ranks[1].keys()
    differs = False
    for name, expected in joint.items():
        for grads in ranks:
            torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-7, msg=name)
        unshared = (per_rank_means[0][name] + per_rank_means[1][name]) / 2
        differs |= not torch.allclose(unshared, expected, rtol=1e-3, atol=1e-6)
    assert differs, "the unshared average equals the global mean: the test cannot tell the two apart"
