"""Bad inputs fail early with one line naming them: a ``--ckpt_path`` that is no checkpoint, a model path that names
no folder, and a data file that does not parse (file and 1-based line), each before any model is loaded."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from gcpo_lightning.cli import GCPOCLI, CheckpointError, check_ckpt_path, main
from gcpo_lightning.data.datamodules import DataError, HFPromptDataModule
from gcpo_lightning.data.sources import Source
from gcpo_lightning.module import GCPOModule
from gcpo_lightning.policy.loading import ModelPathError, check_model_path, load_causal_lm, load_tokenizer

SHIPPED = r"tiny-arith, smollm2-135m-instruct"

# The module is being refactored: the model path is ``model.policy_builder.model_name_or_path`` once
# ``PolicyBuilder`` is injected, ``model.model_name_or_path`` before.
MODEL_OPTION = (
    "--model.policy_builder.model_name_or_path"
    if "policy_builder" in inspect.signature(GCPOModule).parameters
    else "--model.model_name_or_path"
)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any ``from_pretrained`` of a model or tokenizer fails the test."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(*args, **kwargs):
        raise AssertionError(f"a model or tokenizer was loaded: from_pretrained{args}")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fail)


@pytest.fixture
def nothing_instantiated(monkeypatch, no_model_load):
    """The CLI instantiating its classes (module, data, trainer) fails the test."""

    def fail(self):
        raise AssertionError("the CLI instantiated its classes before checking ckpt_path")

    monkeypatch.setattr(GCPOCLI, "instantiate_classes", fail)


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


GOOD = [json.dumps({"question": f"{i}+{i}", "answer": str(2 * i)}) for i in range(1, 6)]
BROKEN = '{"question": "3+3" "answer": "6"}'  # no comma between the members


# ----- ckpt_path -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_ckpt_path_that_is_not_a_checkpoint(tmp_path, nothing_instantiated, subcommand):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint\n")
    with pytest.raises(
        CheckpointError,
        match=r"^ckpt_path '.*notes\.ckpt': not a checkpoint \(not a file written "
        r"by torch\.save; torch\.load: UnpicklingError\)$",
    ):
        main([subcommand, "--config", "configs/grpo.yaml", f"--ckpt_path={bad}"])


def test_ckpt_path_that_does_not_exist(tmp_path, nothing_instantiated):
    with pytest.raises(CheckpointError, match=r"^ckpt_path '.*missing\.ckpt': no such file or folder$"):
        main(["fit", "--config", "configs/grpo.yaml", f"--ckpt_path={tmp_path / 'missing.ckpt'}"])


def test_ckpt_path_folder_without_distributed_metadata(tmp_path, nothing_instantiated):
    with pytest.raises(CheckpointError, match=r"ckpt_path '.*': a folder without a \.metadata file"):
        main(["fit", "--config", "configs/grpo.yaml", f"--ckpt_path={tmp_path}"])


def test_ckpt_path_bare_state_dict_and_non_mapping(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(
        CheckpointError,
        match=r"bare\.pt': not a Lightning checkpoint: no 'state_dict' or "
        r"'pytorch-lightning_version' key",
    ):
        check_ckpt_path(tmp_path / "bare.pt")
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    with pytest.raises(
        CheckpointError, match=r"old\.ckpt': not a Lightning checkpoint: no 'pytorch-lightning_version'"
    ):
        check_ckpt_path(tmp_path / "old.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.ckpt': holds a list, not a Lightning checkpoint"):
        check_ckpt_path(tmp_path / "list.ckpt")


def test_ckpt_path_accepts_checkpoints_and_lightning_names(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}, "pytorch-lightning_version": "2.6.0"}, tmp_path / "ok.ckpt")
    check_ckpt_path(tmp_path / "ok.ckpt")
    sharded = tmp_path / "step=2.ckpt"  # FSDP2 (ModelParallelStrategy): one folder per checkpoint
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    check_ckpt_path(sharded)
    for name in (None, "last", "best", "hpc", "registry", "registry:model:latest", "s3://bucket/run/last.ckpt"):
        check_ckpt_path(name)


def test_ckpt_path_error_is_one_line_on_the_command_line(tmp_path, monkeypatch, nothing_instantiated):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("not a checkpoint\n")
    monkeypatch.setattr(sys, "argv", ["gcpo_lightning", "fit", "--config", "configs/grpo.yaml", f"--ckpt_path={bad}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    message = str(exit_info.value.code)
    assert message.startswith(f"error: ckpt_path '{bad}': not a checkpoint") and "\n" not in message


# ----- model_name_or_path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/no/such/dir", "./no/such/dir", "../no-such-dir", "~/no-such-dir-gcpo", "runs/a/b", "C:\\models\\x"]
)
def test_missing_model_path_is_named(path, no_model_load):
    message = (
        rf"^model_name_or_path {re.escape(repr(path))}: no such folder \(and not a shipped model name: {SHIPPED}\)$"
    )
    with pytest.raises(ModelPathError, match=message):
        check_model_path(path)
    with pytest.raises(ModelPathError, match="no such folder"):
        load_causal_lm(path)
    with pytest.raises(ModelPathError, match="no such folder"):
        load_tokenizer(path)


def test_model_path_that_is_a_file(tmp_path, no_model_load):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelPathError, match=r"model\.safetensors': is a file; give the folder holding config\.json"):
        load_causal_lm(str(weights))


def test_model_names_folders_and_hub_ids_pass_the_check(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("tiny-arith", "smollm2-135m-instruct", str(tmp_path), "Qwen/Qwen2.5-0.5B", "gpt2"):
        check_model_path(name)  # no network: a Hub id is only checked for its shape while online


def test_hub_id_offline_and_not_cached(monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelPathError,
        match=rf"^model_name_or_path 'nobody-gcpo/no-such-model': not a shipped model "
        rf"name \({SHIPPED}\), not a local folder, and not in the Hugging Face "
        r"cache while the Hub is offline",
    ):
        check_model_path("nobody-gcpo/no-such-model")


def test_hub_id_that_cannot_be_fetched_is_one_line(monkeypatch):
    from transformers import AutoTokenizer

    def not_found(*args, **kwargs):
        raise OSError("nobody-gcpo/x is not a local folder and is not a valid model identifier\nlisted on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", not_found)
    with pytest.raises(
        ModelPathError,
        match=r"^tokenizer 'nobody-gcpo/x': not a shipped model name .*not loadable "
        r"from the Hugging Face Hub or its cache: nobody-gcpo/x is not a local "
        r"folder and is not a valid model identifier listed on the Hub$",
    ):
        load_tokenizer("nobody-gcpo/x", setting="tokenizer")


def test_local_model_folder_still_loads(tiny_model_dir):
    assert load_tokenizer(str(tiny_model_dir)).padding_side == "left"


def test_missing_model_path_from_the_command_line(tmp_path, no_model_load):
    with pytest.raises(ModelPathError, match=r"^model_name_or_path '/no/such/dir': no such folder"):
        main(
            [
                "fit",
                "--config",
                "configs/grpo.yaml",
                f"{MODEL_OPTION}=/no/such/dir",
                "--data.init_args.num_train=16",
                "--data.init_args.num_val=4",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )


# ----- data files ------------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tmp_path, no_model_load):
    bad = write_lines(tmp_path / "train.jsonl", [GOOD[0], GOOD[1], BROKEN, GOOD[2]])
    with pytest.raises(DataError, match=r"^.*train\.jsonl line 3: not valid JSON: Expecting ',' delimiter"):
        HFPromptDataModule(path=bad, val_size=1).setup("fit")


def test_line_numbers_count_blank_lines(tmp_path):
    bad = write_lines(tmp_path / "gaps.jsonl", [GOOD[0], "", GOOD[1], "", BROKEN])
    with pytest.raises(DataError, match=r"gaps\.jsonl line 5: not valid JSON"):
        Source.make(bad, None, "train").load()


def test_malformed_first_line(tmp_path):
    bad = write_lines(tmp_path / "first.jsonl", ['{"question": "1+1", "answer": "2"', GOOD[1]])
    with pytest.raises(DataError, match=r"first\.jsonl line 1: not valid JSON"):
        Source.make(bad, None, "train").load()


def test_malformed_data_files_and_val_data_files(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    bad = write_lines(tmp_path / "val.jsonl", [GOOD[0], BROKEN])
    with pytest.raises(DataError, match=r"train_bad\.jsonl line 2: not valid JSON"):
        HFPromptDataModule(
            path="json", data_files=write_lines(tmp_path / "train_bad.jsonl", [GOOD[0], BROKEN]), val_size=1
        ).setup("fit")
    with pytest.raises(DataError, match=r"val\.jsonl line 2: not valid JSON"):
        HFPromptDataModule(path="json", data_files=good, val_data_files=bad).setup("fit")
    with pytest.raises(DataError, match=r"val\.jsonl line 2: not valid JSON"):  # every split is built, not just one
        Source.make("json", {"train": good, "validation": bad}, "train").load()


def test_line_that_is_not_an_object(tmp_path):
    bad = write_lines(tmp_path / "list.jsonl", [GOOD[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl line 2: expected a JSON object, got list: \[1, 2\]$"):
        Source.make(bad, None, "train").load()


def test_malformed_json_document(tmp_path):
    doc = tmp_path / "rows.json"
    doc.write_text('[\n  {"question": "1+1", "answer": "2"},\n  {"question": "2+2" "answer": "4"}\n]\n')
    with pytest.raises(DataError, match=r"rows\.json line 3: not valid JSON: Expecting ',' delimiter \(column 22\)"):
        Source.make(str(doc), None, "train").load()


def test_missing_empty_and_unmatched_data_files(tmp_path):
    with pytest.raises(DataError, match=r"^data file '.*nope\.jsonl': no such file$"):
        HFPromptDataModule(path=str(tmp_path / "nope.jsonl")).setup("fit")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^data file '.*empty\.jsonl': the file is empty$"):
        Source.make("json", str(tmp_path / "empty.jsonl"), "train").load()
    with pytest.raises(DataError, match=r"^data file pattern '.*\*\.jsonl': matches no file$"):
        Source.make("json", str(tmp_path / "sub" / "*.jsonl"), "train").load()


def test_malformed_csv_names_the_file(tmp_path):
    bad = tmp_path / "rows.csv"
    bad.write_text("question,answer\n1+1,2\n2+2,4,extra\n")
    with pytest.raises(DataError, match=r"rows\.csv: could not be read as csv: ParserError: .*line 3"):
        Source.make(str(bad), None, "train").load()


def test_good_files_still_load(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [GOOD[0], "", *GOOD[1:]])
    dm = HFPromptDataModule(path=good, val_size=1)
    dm.setup("fit")
    assert len(dm.train_rows) + len(dm.val_rows) == len(GOOD)


def test_malformed_data_from_the_command_line(tmp_path, no_model_load):
    bad = write_lines(tmp_path / "cli.jsonl", [GOOD[0], GOOD[1], BROKEN])
    with pytest.raises(DataError, match=r"cli\.jsonl line 3: not valid JSON"):
        main(
            [
                "fit",
                "--config",
                "configs/grpo.yaml",
                "--data=gcpo_lightning.data.HFPromptDataModule",
                f"--data.path={bad}",
                "--data.val_size=1",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )
