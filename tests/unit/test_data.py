"""Data modules: rows load through ``datasets`` from local files and bad rows are named."""

from __future__ import annotations

import json

import pytest

from gcpo_lightning.data.datamodules import ArithmeticDataModule, DataError, HFPromptDataModule, validate_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_through_datasets_with_column_mapping(tmp_path):
    rows = [{"problem": f"{i}+1", "solution": str(i + 1)} for i in range(10)]
    dm = HFPromptDataModule(
        data_files=write_jsonl(tmp_path / "train.jsonl", rows),
        prompt_column="problem",
        prompt_template="Q: {question}\nA:",
        columns={"answer": "solution"},
        val_size=3,
        batch_size=2,
    )
    dm.setup("fit")
    assert len(dm.train_rows) == 7 and len(dm.val_rows) == 3
    row = dm.train_rows[0]
    assert row["prompt"].startswith("Q: ") and row["answer"] == str(int(row["prompt"][3:].split("+")[0]) + 1)
    assert len(next(iter(dm.train_dataloader()))) == 2


def test_parquet_validation_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"question": "1+1", "answer": "2"}] * 4).to_parquet(tmp_path / "v.parquet")
    dm2 = HFPromptDataModule(path="parquet", data_files=str(tmp_path / "v.parquet"), val_size=1)
    dm2.setup("fit")
    assert dm2.val_rows[0]["answer"] == "2"


def test_empty_prompt_row_is_named(tmp_path):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "  ", "answer": "3"}]
    dm = HFPromptDataModule(data_files=write_jsonl(tmp_path / "t.jsonl", rows), val_size=1)
    with pytest.raises(DataError, match=r"row 1: column 'question' is empty"):
        dm.setup("fit")


def test_missing_column_is_named(tmp_path):
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2"}, {"question": "3+3", "answer": "6"}]
    dm = HFPromptDataModule(data_files=write_jsonl(tmp_path / "t.jsonl", rows), val_size=1)
    with pytest.raises(DataError, match=r"t.jsonl row 1: no value in column\(s\) \['answer'\]"):
        dm.setup("fit")


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        validate_rows([], "empty.jsonl")


def test_arithmetic_rows_exclude_heldout_questions():
    dm = ArithmeticDataModule(num_train=2000, num_val=50)
    dm.setup("fit")
    held = {r["question"] for r in dm.val_rows}
    assert len(dm.val_rows) == 50 and not held & {r["question"] for r in dm.train_rows}
    assert all(r["prompt"] == f"Problem: {r['question']}\nSolution:" for r in dm.train_rows[:20])


def test_template_without_placeholder_is_rejected():
    with pytest.raises(ValueError, match="question"):
        ArithmeticDataModule(prompt_template="no placeholder")
