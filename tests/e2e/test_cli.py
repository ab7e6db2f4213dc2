"""The command line: every shipped config instantiates, components swap by class_path, help and print_config work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gcpo_lightning.cli import main
from gcpo_lightning.module import GCPOModule

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))


ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]  # GPU configs are checked here on the CPU


SLOTS = ("sampler", "graph_builder", "adjuster", "kl")


def assert_matches(obj: object, expected: object, where: str) -> None:
    """``obj`` is what the YAML ``expected`` describes: the class ``class_path`` names, with every scalar init arg
    (components keep each ``__init__`` argument under its own name); a string naming a class (``backend:
    KVCacheLoop``) or a mapping of settings (``lora: {r: 16}``) is compared with the object the CLI built from it."""
    if isinstance(expected, dict) and ("class_path" in expected or "init_args" in expected):  # an overlay: init_args
        if "class_path" in expected:
            assert type(obj).__name__ == expected["class_path"].rsplit(".", 1)[-1], where
        expected = expected.get("init_args", {})
    if isinstance(expected, dict):
        for key, value in expected.items():
            assert_matches(obj[key] if isinstance(obj, dict) else getattr(obj, key), value, f"{where}.{key}")
    elif isinstance(expected, str) and not isinstance(obj, str):
        assert type(obj).__name__ == expected, where
    elif isinstance(expected, (bool, int, float, str)) or expected is None:
        assert obj == expected, f"{where}: {obj!r} != {expected!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_instantiates(config):
    """Every shipped config builds the system it describes, not merely some GCPOModule."""
    spec = yaml.safe_load(config.read_text())
    on_gpu = spec["trainer"].get("accelerator") in ("gpu", "cuda")
    cli = main(["--config", str(config), *(ON_CPU if on_gpu else [])], run=False)
    assert isinstance(cli.model, GCPOModule)
    for slot in SLOTS:
        if slot in spec["model"]:
            assert_matches(getattr(cli.model, slot), spec["model"][slot], slot)
    assert cli.model.num_generations == spec["model"]["num_generations"]
    assert_matches(cli.model.policy_builder, spec["model"]["policy_builder"], "policy_builder")
    assert type(cli.datamodule).__name__ == spec["data"]["class_path"].rsplit(".", 1)[-1]
    assert cli.trainer.max_steps == spec["trainer"]["max_steps"]


@pytest.mark.parametrize("overlay", sorted(Path(CONFIGS[0].parent, "overlays").glob("*.yaml")), ids=lambda p: p.name)
def test_every_overlay_composes_with_the_default(overlay):
    """The overlay's settings reach the built objects, and the base config's other settings stay."""
    spec = yaml.safe_load(overlay.read_text())
    cli = main(["--config", "configs/gcpo.yaml", "--config", str(overlay), *ON_CPU], run=False)
    for slot, expected in spec["model"].items():
        assert_matches(getattr(cli.model, slot), expected, slot)
    if "strategy" in spec.get("trainer", {}):
        assert_matches(cli.trainer.strategy, {"class_path": spec["trainer"]["strategy"]["class_path"]}, "strategy")
    if "precision" in spec.get("trainer", {}):
        assert cli.trainer.precision == spec["trainer"]["precision"]
    assert type(cli.model.adjuster).__name__ == "CausalAdvantage" and cli.model.adjuster.alpha == 2.0  # the base


def test_swap_component_in_yaml(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"model": {"adjuster": {"class_path": "custom_components.ScaledAdvantage", "init_args": {"scale": 3.0}}}}
        )
    )
    cli = main(["--config", "configs/grpo.yaml", "--config", str(overlay)], run=False)
    assert type(cli.model.adjuster).__name__ == "ScaledAdvantage" and cli.model.adjuster.scale == 3.0


def test_swap_component_on_command_line():
    cli = main(
        [
            "--config",
            "configs/grpo.yaml",
            "--model.adjuster=custom_components.ScaledAdvantage",
            "--model.adjuster.scale=0.5",
            "--model.reward_funcs=[custom_components.length_reward]",
        ],
        run=False,
    )
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


@pytest.mark.slow
def test_fit_then_validate_from_the_command_line(tiny_model_dir, tmp_path):
    common = [
        "--config",
        "configs/grpo.yaml",
        f"--model.policy_builder.model_name_or_path={tiny_model_dir}",
        "--model.num_generations=2",
        "--model.sampler.init_args.max_completion_length=6",
        "--data.init_args.num_val=4",
        "--data.init_args.batch_size=2",
        "--data.init_args.num_train=16",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    cli = main(["validate", *common, f"--ckpt_path={ckpt}"])
    assert "val/accuracy" in cli.trainer.callback_metrics
