"""Checkpoints rebuild the system that was trained: ``load_from_checkpoint`` returns the same components.

Before the redesign the components were left out of the hyperparameters, so a GCPO checkpoint loaded back as
GRPO (``GroupNormalizedAdvantage``, ``IndependentResponses``, ``ReferenceKL``) without a word.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from gcpo_lightning.cli import main
from gcpo_lightning.components.adjusters.causal import CausalAdvantage
from gcpo_lightning.components.graphs.collider import ColliderGraphBuilder
from gcpo_lightning.components.penalties.causal_kl import CausalProjectedKL
from gcpo_lightning.module import COMPONENTS, GCPOModule
from gcpo_lightning.policy.builder import BuiltModels, PolicyBuilder
from gcpo_lightning.training.hparams import to_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


def hparams_checkpoint(module: GCPOModule, path: Path) -> Path:
    """A checkpoint file holding the module's hyperparameters and no weights (nothing is loaded to save it)."""
    torch.save(
        {"state_dict": {}, "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": L.__version__}, path
    )
    return path


def configs_of(module: GCPOModule) -> dict:
    return {name: to_config(getattr(module, name), name) for name in COMPONENTS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_rebuilds_its_components(config: Path, tmp_path: Path, monkeypatch) -> None:
    # load_from_checkpoint builds the models (configure_model); the paper configs' models are not on this machine,
    # and the components, not the weights, are under test here
    monkeypatch.setattr(PolicyBuilder, "build", lambda self, *a, **k: BuiltModels(torch.nn.Linear(1, 1), None, None))
    cli = main(
        [
            "--config",
            str(config),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    trained = cli.model
    loaded = GCPOModule.load_from_checkpoint(hparams_checkpoint(trained, tmp_path / "h.ckpt"), strict=False)
    for name in COMPONENTS:
        assert type(getattr(loaded, name)) is type(getattr(trained, name)) or name == "reward_funcs", name
    assert configs_of(loaded) == configs_of(trained)
    assert loaded.num_generations == trained.num_generations and loaded.epsilon_high == trained.epsilon_high


@pytest.mark.slow
def test_a_trained_gcpo_checkpoint_loads_as_gcpo_with_its_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    main(
        [
            "fit",
            "--config",
            "configs/gcpo.yaml",
            f"--model.policy_builder.model_name_or_path={tiny_model_dir}",
            "--model.num_generations=2",
            "--model.micro_batch_size=null",
            "--model.sampler.init_args.max_completion_length=6",
            "--model.graph_builder.init_args.num_integrated=2",
            "--model.kl.init_args.kappa=0.05",
            "--data.init_args.num_val=2",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_train=8",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    ckpt = max(tmp_path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)  # saved after the only step
    module = GCPOModule.load_from_checkpoint(ckpt)
    assert isinstance(module.adjuster, CausalAdvantage) and module.adjuster.alpha == 2.0
    assert isinstance(module.graph_builder, ColliderGraphBuilder) and module.graph_builder.num_integrated == 2
    assert isinstance(module.kl, CausalProjectedKL) and module.kl.kappa == 0.05
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    weights = {f"policy.{k}": v for k, v in module.policy.state_dict().items()}
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)


def _local_reward(completions, **_):
    return [0.0 for _ in completions]


def test_a_component_that_cannot_be_described_is_asked_for_by_name(tmp_path: Path) -> None:
    module = GCPOModule(policy_builder=PolicyBuilder("tiny-arith"), reward_funcs=[lambda completions, **_: [0.0]])
    path = hparams_checkpoint(module, tmp_path / "h.ckpt")
    with pytest.raises(ValueError, match=r"cannot rebuild reward_funcs .*lambda.*pass reward_funcs=\.\.\."):
        GCPOModule.load_from_checkpoint(path, strict=False)
    loaded = GCPOModule.load_from_checkpoint(path, strict=False, reward_funcs=[_local_reward])
    assert loaded.reward_funcs == [_local_reward]
