"""The command line: every shipped config instantiates, components swap by class_path, help and print_config work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gcpo_lightning.cli import main
from gcpo_lightning.module import GCPOModule

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]  # GPU configs are checked here on the CPU


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_instantiates(config):
    on_gpu = yaml.safe_load(config.read_text())["trainer"].get("accelerator") in ("gpu", "cuda")
    cli = main(["--config", str(config), *(ON_CPU if on_gpu else [])], run=False)
    assert isinstance(cli.model, GCPOModule)
    assert cli.datamodule is not None
    assert cli.trainer.max_steps > 0


@pytest.mark.parametrize("overlay", sorted(Path(CONFIGS[0].parent, "overlays").glob("*.yaml")), ids=lambda p: p.name)
def test_every_overlay_composes_with_the_default(overlay):
    cli = main(["--config", "configs/gcpo.yaml", "--config", str(overlay), *ON_CPU], run=False)
    assert isinstance(cli.model, GCPOModule)


def test_swap_component_in_yaml(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"adjuster": {"class_path": "custom_components.ScaledAdvantage",
                                                              "init_args": {"scale": 3.0}}}}))
    cli = main(["--config", "configs/grpo.yaml", "--config", str(overlay)], run=False)
    assert type(cli.model.adjuster).__name__ == "ScaledAdvantage" and cli.model.adjuster.scale == 3.0


def test_swap_component_on_command_line():
    cli = main(["--config", "configs/grpo.yaml", "--model.adjuster=custom_components.ScaledAdvantage",
                "--model.adjuster.scale=0.5", "--model.reward_funcs=[custom_components.length_reward]"], run=False)
    assert cli.model.adjuster.scale == 0.5
    assert cli.model.reward_funcs[0].__name__ == "length_reward"


def test_unknown_class_path_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["--config", "configs/grpo.yaml", "--model.adjuster=nowhere.NoSuchAdjuster"], run=False)
    assert "nowhere.NoSuchAdjuster" in capsys.readouterr().err


def test_print_config_round_trips(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--config", "configs/grpo.yaml", "--print_config"], run=False)
    printed = capsys.readouterr().out
    assert "class_path: gcpo_lightning.GroupSampler" in printed
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    cli = main(["--config", str(saved)], run=False)
    assert cli.model.num_generations == 8


def test_component_help_prints_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["--model.sampler.help", "GroupSampler"], run=False)
    out = capsys.readouterr().out
    assert "max_completion_length" in out and "maximum new tokens per completion" in out


def test_bad_setting_from_yaml_names_it(capsys):
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["--config", "configs/grpo.yaml", "--model.num_generations=1"], run=False)
    text = str(err.value) + capsys.readouterr().err
    assert "num_generations must be >= 2" in text


def test_fit_then_validate_from_the_command_line(tiny_model_dir, tmp_path):
    common = ["--config", "configs/grpo.yaml", f"--model.policy_builder.model_name_or_path={tiny_model_dir}",
              "--model.num_generations=2", "--model.sampler.init_args.max_completion_length=6",
              "--data.init_args.num_val=4", "--data.init_args.batch_size=2", "--data.init_args.num_train=16",
              "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    cli = main(["validate", *common, f"--ckpt_path={ckpt}"])
    assert "val/accuracy" in cli.trainer.callback_metrics
