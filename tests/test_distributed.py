"""FSDP2 (Lightning's ModelParallelStrategy) on CPU with two gloo processes: GCPO steps, rewards gathered across
ranks, a sharded checkpoint, exact resume and the Hugging Face export.

Each run is ``tests/distributed_fit.py`` in a subprocess: Lightning relaunches the command line for rank 1, so it
must never run inside the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcpo_lightning import CausalAdvantage
from gcpo_lightning.interfaces.containers import CausalGraph

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).parent / "distributed_fit.py"


def run_fit(model: Path, out: Path, *args: str, timeout: int = 600) -> Path:
    """Run the driver to completion; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(model), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def metrics(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"metrics_rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 4-step run, and a run checkpointed at step 2 then resumed to step 4."""
    root = tmp_path_factory.mktemp("fsdp")
    full = run_fit(tiny_model_dir, root / "full", "--max-steps", "4")
    first = run_fit(tiny_model_dir, root / "first", "--max-steps", "2", "--save-at", "2")
    resumed = run_fit(tiny_model_dir, root / "resumed", "--max-steps", "4",
                      "--resume", str(first / "ckpt" / "step=2.ckpt"))
    return {"full": full, "first": first, "resumed": resumed}


def test_policy_is_sharded_and_checkpoint_is_distributed(runs):
    assert metrics(runs["full"])["sharded"] and metrics(runs["full"], 1)["sharded"]
    ckpt = runs["first"] / "ckpt" / "step=2.ckpt"
    assert ckpt.is_dir()  # one shard file per rank plus Lightning's metadata, no reference weights
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    assert len(meta["gcpo_rng_states"]) == 2 and "combined_loader" in meta["loops"]["fit_loop"]["state_dict"]


def test_evaluation_under_fsdp_is_synced_across_ranks(runs):
    val = metrics(runs["full"])["val"]
    assert {"val/accuracy", "val/pass@1", "val/pass@2", "val/mean@2", "val/reward"} <= val.keys()
    assert metrics(runs["full"], 1)["val"] == val  # every rank computes the same, global numbers


def test_rewards_are_gathered_and_groups_stay_on_their_rank(runs):
    ranks = [torch.load(runs["full"] / f"rank{r}_step1.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]  # each rank trains on its own prompts
    everything = torch.cat([ranks[0]["rewards"], ranks[1]["rewards"]])
    for rank in ranks:
        assert torch.equal(rank["batch_rewards"], everything)
    # the advantages (scale_rewards="batch") equal one process computing over both ranks' groups at once
    graph = CausalGraph(group_size=4, representations=torch.cat([r["z"] for r in ranks]),
                        context_representations=torch.cat([r["context_z"] for r in ranks]))
    rollout = type("R", (), {"group_size": 4})()
    joint = CausalAdvantage(alpha=2.0, scale_rewards="batch").adjust(everything, rollout, graph).values
    torch.testing.assert_close(torch.cat([r["advantages"] for r in ranks]), joint)


def test_resume_from_sharded_checkpoint_is_exact(runs):
    full, resumed = metrics(runs["full"])["rows"], metrics(runs["resumed"])["rows"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed == full[2:]  # every logged metric of steps 3 and 4, bit for bit
    assert metrics(runs["resumed"])["val"] == metrics(runs["full"])["val"]  # and the final evaluation
    a = torch.load(runs["full"] / "weights.pt")
    b = torch.load(runs["resumed"] / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_from_sharded_policy_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["full"] / "hf")
    weights = torch.load(runs["full"] / "weights.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_fsdp2_with_a_4bit_reference_and_bf16_all_gathers(tiny_model_dir, tmp_path):
    out = run_fit(tiny_model_dir, tmp_path / "q4", "--max-steps", "2", "--reference-4bit",
                  "--fsdp-param-dtype", "bfloat16")
    summary = metrics(out)
    assert summary["sharded"] and summary["reference_4bit"]
    assert all(r["kl"] >= 0 for r in summary["rows"]) and summary["rows"][-1]["kl"] > 0


def test_fsdp2_with_lora_trains_adapters_and_exports_merged(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_fit(tiny_model_dir, tmp_path / "lora", "--max-steps", "2", "--lora")
    summary = metrics(out)
    assert summary["sharded"] and summary["trainable"] and all("lora_" in n for n in summary["trainable"])
    kls = [r["kl"] for r in summary["rows"]]
    assert kls[0] == 0 and kls[-1] > 0  # B = 0 at the start: the policy is its reference; then it moves away
    merged = AutoModelForCausalLM.from_pretrained(out / "hf").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("proj" in k for k in changed)  # only the adapted projections differ from the base


@pytest.mark.parametrize(("strategy", "message"), [
    ("ddp", "DDPStrategy is not supported; use lightning.pytorch.strategies.ModelParallelStrategy"),
    ("tp", "needs tensor_parallel_size=1"),
])
def test_unsupported_strategies_are_refused_before_loading(strategy, message):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from gcpo_lightning.training.distributed import check_strategy

    cpus = [torch.device("cpu")] * 2
    made = (DDPStrategy(parallel_devices=cpus) if strategy == "ddp"
            else ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    made.parallel_devices = cpus
    with pytest.raises(ValueError, match=message):
        check_strategy(made)
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))  # FSDP only: accepted


def _dapo_rank(rank: int, tokens: list[torch.Tensor], out: str) -> None:
    """One gloo rank: DAPO token-mean loss on its own tokens, scaled by rank_share, gradients averaged (as FSDP)."""
    import torch.distributed as dist

    from gcpo_lightning.functional.losses import token_mean
    from gcpo_lightning.training.distributed import rank_share

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    w = torch.ones((), requires_grad=True)
    x = tokens[rank]  # [n, T] per-token values; the mask marks real tokens
    mask = (x != 0).float()
    (token_mean(w * x, mask, 0) * rank_share(mask.sum())).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    torch.save(grad / 2, f"{out}/grad{rank}.pt")  # data parallel: the mean of the ranks' gradients
    dist.destroy_process_group()


def test_dapo_token_mean_is_global_across_ranks(tmp_path):
    # rank 0 holds 2 tokens (1, 2), rank 1 holds 4 tokens (3, 4, 5, 6): the step's token mean of d(w*x)/dw is
    # (1+2+3+4+5+6) / 6 = 3.5. Without the share, averaging the ranks' own means gives (1.5 + 4.5) / 2 = 3.0.
    tokens = [torch.tensor([[1.0, 2.0, 0.0, 0.0]]), torch.tensor([[3.0, 4.0, 5.0, 6.0]])]
    torch.multiprocessing.spawn(_dapo_rank, args=(tokens, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"grad{rank}.pt").item() == pytest.approx(3.5)
