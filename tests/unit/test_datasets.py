"""Real reasoning datasets: presets (GSM8K, MATH, HumanEval) read through ``datasets``, filters, splits, shuffling,
and the offline word-problem generator."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from gcpo_lightning.data.datamodules import DataError, HFPromptDataModule, WordProblemDataModule
from gcpo_lightning.data.presets import GSM8K, HUMANEVAL, MATH, PRESETS, GSM8KPreset, Preset, PresetName, get_preset
from gcpo_lightning.data.tasks.word_problems import TEMPLATES, WordProblemTask, write_word_problems

SAMPLES = Path(__file__).parents[2] / "gcpo_lightning" / "assets" / "samples"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sample_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / f"{name}_sample.jsonl").read_text().splitlines()]


def all_rows(dm: HFPromptDataModule) -> list[dict]:
    return dm.train_rows + dm.val_rows


# ----- the shipped samples, each with its preset ---------------------------------------------------------------


def test_gsm8k_sample_with_preset():
    dm = HFPromptDataModule(path=str(SAMPLES / "gsm8k_sample.jsonl"), preset="gsm8k", val_size=2)
    dm.setup("fit")
    rows = all_rows(dm)
    assert len(rows) == len(sample_rows("gsm8k")) and len(dm.val_rows) == 2
    by_question = {r["question"]: r for r in rows}
    for raw in sample_rows("gsm8k"):
        row = by_question[raw["question"]]
        assert row["solution"] == raw["answer"]  # the full worked solution is kept
        assert row["answer"] == raw["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert row["prompt"].startswith(raw["question"]) and "\\boxed{}" in row["prompt"]
    assert {r["answer"] for r in rows} >= {"72", "1200"}  # "#### 1,200" loses its thousands separator


def test_math_sample_with_preset():
    dm = HFPromptDataModule(path=str(SAMPLES / "math_sample.jsonl"), preset="math", val_size=3)
    dm.setup("fit")
    answers = {r["question"]: r["answer"] for r in all_rows(dm)}
    assert len(answers) == len(sample_rows("math"))
    assert (
        answers["What is the value of $\\frac{3}{4} + \\frac{5}{6}$? Express your answer as a common fraction."]
        == "\\frac{19}{12}"
    )
    assert answers["Simplify $\\sqrt{72}$."] == "6\\sqrt{2}"
    assert all(r["solution"] and r["prompt"].startswith(r["question"]) for r in all_rows(dm))


def test_humaneval_sample_with_preset():
    dm = HFPromptDataModule(path=str(SAMPLES / "humaneval_sample.jsonl"), preset="humaneval", val_size=2)
    dm.setup("fit")
    raw = {r["task_id"]: r for r in sample_rows("humaneval")}
    for row in all_rows(dm):
        original = raw[row["task_id"]]
        assert row["code_prompt"] == row["question"] == original["prompt"]
        assert row["test"] == original["test"] and row["entry_point"] == original["entry_point"]
        assert original["prompt"] in row["prompt"] and row["prompt"] != original["prompt"]


def test_humaneval_sample_solutions_pass_their_tests():
    for row in sample_rows("humaneval"):
        namespace: dict = {}
        exec(row["prompt"] + row["canonical_solution"] + "\n" + row["test"], namespace)  # our own sample file
        namespace["check"](namespace[row["entry_point"]])


# ----- column mapping and errors -------------------------------------------------------------------------------


def test_column_mapping_overrides_the_preset(tmp_path):
    rows = [{"q": f"What is {i} + 1?", "worked": f"{i} + 1 = {i + 1}\n#### {i + 1}", "src": "mine"} for i in range(6)]
    dm = HFPromptDataModule(
        data_files=write_jsonl(tmp_path / "t.jsonl", rows),
        preset="gsm8k",
        prompt_column="q",
        prompt_template="Q: {question}\nA:",
        columns={"solution": "worked", "origin": "src"},
        val_size=2,
    )
    dm.setup("fit")
    for row in all_rows(dm):
        i = int(row["question"].split()[2])
        assert row["answer"] == str(i + 1) and row["origin"] == "mine"
        assert row["prompt"] == f"Q: {row['question']}\nA:"


def test_missing_mapped_column_names_file_row_and_columns(tmp_path):
    rows = [{"question": "a", "answer": "x\n#### 1"}, {"question": "b", "solution": "#### 2"}]
    dm = HFPromptDataModule(data_files=write_jsonl(tmp_path / "gsm.jsonl", rows), preset="gsm8k", val_size=1)
    with pytest.raises(
        DataError,
        match=r"gsm.jsonl row 1: no value in column\(s\) \['answer'\]; "
        r"the row has \['question', 'solution'\]",
    ):
        dm.setup("fit")


def test_gsm8k_row_without_hashes_is_named(tmp_path):
    rows = [{"question": "a", "answer": "1 + 1 = 2\n#### 2"}, {"question": "b", "answer": "the answer is 3"}]
    dm = HFPromptDataModule(data_files=write_jsonl(tmp_path / "g.jsonl", rows), preset="gsm8k", val_size=1)
    with pytest.raises(DataError, match=r"g.jsonl row 1: the solution has no '#### <answer>' line"):
        dm.setup("fit")


def test_math_row_without_boxed_or_answer_is_named(tmp_path):
    rows = [{"problem": "p0", "solution": "so $\\boxed{1}$"}, {"problem": "p1", "solution": "it is 4"}]
    dm = HFPromptDataModule(data_files=write_jsonl(tmp_path / "m.jsonl", rows), preset="math", val_size=1)
    with pytest.raises(DataError, match=r"m.jsonl row 1: no answer: the row has no 'answer' value"):
        dm.setup("fit")


def test_skip_bad_rows_drops_and_logs_them(tmp_path, caplog):
    rows = [{"problem": f"p{i}", "solution": f"$\\boxed{{{i}}}$" if i % 3 else "a proof"} for i in range(9)]
    dm = HFPromptDataModule(
        data_files=write_jsonl(tmp_path / "m.jsonl", rows), preset="math", val_size=2, skip_bad_rows=True
    )
    with caplog.at_level(logging.WARNING, logger="gcpo_lightning.data.datamodules"):
        dm.setup("fit")
    assert sorted(int(r["answer"]) for r in all_rows(dm)) == [1, 2, 4, 5, 7, 8]
    assert sum(dm.skipped.values()) == 3 and "skipped 3 of 9 rows" in caplog.text


def test_math500_style_answer_column_wins(tmp_path):
    rows = [
        {"problem": "p", "solution": "first $\\boxed{2}$ then $\\boxed{3}$", "answer": "\\frac{1}{2}"},
        {"problem": "q", "solution": "no box here", "answer": "7"},
    ]
    dm = HFPromptDataModule(
        path="json",
        data_files=str(tmp_path / "unused.jsonl"),
        preset="math",
        val_path=write_jsonl(tmp_path / "math500.jsonl", rows),
        val_split="test",
    )
    assert dm.val_source is not None and dm.val_source.split == "train"  # one local file: datasets' train split
    write_jsonl(tmp_path / "unused.jsonl", [{"problem": "x", "solution": "$\\boxed{0}$"}])
    dm.setup("fit")
    assert sorted(r["answer"] for r in dm.val_rows) == ["7", "\\frac{1}{2}"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("$\\boxed{1}$ or rather $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
        ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        ("so \\boxed 5$.", "5"),
        ("\\fbox{42}", "42"),
        ("\\boxed{unclosed {", None),
        ("no box", None),
    ],
)
def test_math_answer_is_the_last_box_with_nested_braces(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="no answer"):
            MATH.derive({"solution": text})
    else:
        assert MATH.derive({"solution": text}) == {"answer": expected}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the presets once had their own box parser; one parser (the reward side's) now reads both, and these are the
        # inputs where the two differed:
        ("\\boxed{5} and then \\boxed{}", None),  # an empty last box is no answer (not the box before it)
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # the top-level box's content (the grader unwraps the inner box)
        ("\\boxed{a\\\\}b}", "a\\\\"),  # ``\\\\`` is an escaped backslash, so the brace after it closes the box
    ],
)
def test_math_answer_where_the_old_parser_differed(text, expected):
    test_math_answer_is_the_last_box_with_nested_braces(text, expected)


def test_gsm8k_answer_keeps_non_numbers():
    assert GSM8K.derive({"solution": "... \n#### -1,234.5 "}) == {"answer": "-1234.5"}
    assert GSM8K.derive({"solution": "#### 12 apples"}) == {"answer": "12 apples"}
    assert GSM8K.derive({"solution": "#### 1,2345"}) == {"answer": "1,2345"}  # not a thousands separator
    with pytest.raises(ValueError, match="empty"):
        GSM8K.derive({"solution": "x ####  "})
    with pytest.raises(ValueError, match="no '#### <answer>' line"):
        GSM8K.derive({"solution": "the answer is 3"})


def test_gsm8k_answer_drops_the_separators_the_grader_drops():
    # the reward side's thousands rule is the one kept: it also knows a sign and LaTeX separators
    assert GSM8K.derive({"solution": "#### +1,234"}) == {"answer": "+1234"}
    assert GSM8K.derive({"solution": "#### 1{,}234"}) == {"answer": "1234"}
    assert GSM8K.derive({"solution": "#### 1\\,234,567"}) == {"answer": "1234567"}


# ----- presets as classes --------------------------------------------------------------------------------------


def test_builtin_presets_by_name_and_by_instance():
    assert set(PresetName.__args__) == set(PRESETS)
    assert get_preset("gsm8k") is GSM8K and get_preset(MATH) is MATH and get_preset(None) == Preset()
    assert isinstance(GSM8K, GSM8KPreset) and HUMANEVAL.prompt_column == "prompt"
    with pytest.raises(ValueError, match="unknown dataset preset 'gsm9k'"):
        get_preset("gsm9k")


def test_a_preset_instance_equals_its_name(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(6)]
    files = write_jsonl(tmp_path / "g.jsonl", rows)
    by_name = HFPromptDataModule(data_files=files, preset="gsm8k", val_size=2)
    by_instance = HFPromptDataModule(data_files=files, preset=GSM8KPreset(), val_size=2)
    by_name.setup("fit")
    by_instance.setup("fit")
    assert all_rows(by_name) == all_rows(by_instance)


CUSTOM_PRESET = """
from dataclasses import dataclass, field

from gcpo_lightning.data.presets import Preset


@dataclass(frozen=True)
class ShortAnswerPreset(Preset):
    prompt_column: str = "query"
    prompt_template: str = "Q: {question}"
    columns: dict[str, str] = field(default_factory=lambda: {"reply": "reply"})

    def derive(self, row):
        if "=" not in row["reply"]:
            raise ValueError("no '=' in the reply")
        return {"answer": row["reply"].rsplit("=", 1)[1].strip()}
"""


@pytest.fixture
def custom_preset(tmp_path, monkeypatch) -> str:
    """A user's preset module on ``sys.path`` (the package is not edited); returns the data file it reads."""
    (tmp_path / "my_presets.py").write_text(CUSTOM_PRESET)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"query": f"{i} + 2?", "reply": f"{i} + 2 = {i + 2}"} for i in range(5)] + [{"query": "?", "reply": "x"}]
    return write_jsonl(tmp_path / "short.jsonl", rows)


def test_custom_preset_subclass_given_by_class_path(custom_preset, capsys):
    from gcpo_lightning.cli import main

    preset = '{"class_path": "my_presets.ShortAnswerPreset", "init_args": {"prompt_template": "Question: {question}"}}'
    argv = [
        "--data",
        "gcpo_lightning.HFPromptDataModule",
        "--data.preset",
        preset,
        "--data.data_files",
        custom_preset,
        "--data.val_size",
        "2",
        "--data.skip_bad_rows",
        "true",
        "--trainer.logger",
        "false",
    ]
    dm = main(argv, run=False).datamodule
    assert type(dm.preset).__name__ == "ShortAnswerPreset" and dm.prompt_column == "query"
    dm.setup("fit")
    assert min(all_rows(dm), key=lambda r: r["answer"]) == {
        "reply": "0 + 2 = 2",
        "question": "0 + 2?",
        "answer": "2",
        "prompt": "Question: 0 + 2?",
    }
    assert len(all_rows(dm)) == 5 and sum(dm.skipped.values()) == 1  # derive's ValueError skips the bad row
    with pytest.raises(SystemExit):
        main(["fit", *argv, "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: my_presets.ShortAnswerPreset" in printed and "prompt_column: query" in printed


# ----- length filters, splits, shuffling -----------------------------------------------------------------------


def lengths_file(tmp_path: Path) -> str:
    rows = [{"question": "x" * n, "answer": str(n)} for n in range(1, 21)]  # prompt lengths 1..20
    return write_jsonl(tmp_path / "len.jsonl", rows)


def test_prompt_char_filter_drops_and_logs(tmp_path, caplog):
    dm = HFPromptDataModule(data_files=lengths_file(tmp_path), max_prompt_chars=12, val_size=4)
    with caplog.at_level(logging.WARNING, logger="gcpo_lightning.data.datamodules"):
        dm.setup("fit")
    assert sorted(int(r["answer"]) for r in all_rows(dm)) == list(range(1, 13))
    assert sum(dm.dropped.values()) == 8 and "dropped 8 of 20 rows" in caplog.text


def test_prompt_token_filter_with_char_tokenizer(tmp_path, tiny_model_dir):
    dm = HFPromptDataModule(
        data_files=lengths_file(tmp_path),
        max_prompt_tokens=7,
        tokenizer=str(tiny_model_dir),
        prompt_template="Q{question}",
        val_size=2,
    )
    dm.setup("fit")
    assert sorted(int(r["answer"]) for r in all_rows(dm)) == list(range(1, 7))  # one token per character


def test_preset_template_survives_the_cli_default_data_module():
    from gcpo_lightning.cli import main
    from gcpo_lightning.data.templates import HUMANEVAL_TEMPLATE

    cli = main(
        [
            "--data",
            "gcpo_lightning.HFPromptDataModule",
            "--data.preset",
            "humaneval",
            "--data.path",
            "x.jsonl",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert cli.datamodule.prompt_template == HUMANEVAL_TEMPLATE  # not the arithmetic template jsonargparse carries over


def test_token_filter_needs_a_tokenizer():
    with pytest.raises(ValueError, match="max_prompt_tokens needs a tokenizer"):
        HFPromptDataModule(data_files="x.jsonl", max_prompt_tokens=10)


def shuffled_questions(data_files: str, seed: int) -> list[str]:
    dm = HFPromptDataModule(data_files=data_files, seed=seed, val_size=5, max_train_rows=10)
    dm.setup("fit")
    return [r["question"] for r in dm.train_rows + dm.val_rows]


def test_shuffle_is_deterministic(tmp_path):
    files = write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(50)])
    first = shuffled_questions(files, seed=3)
    assert len(first) == 15 and first == shuffled_questions(files, seed=3)
    assert first != shuffled_questions(files, seed=4)


def test_separate_val_and_test_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"t{i}", "answer": "1"} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": f"v{i}", "answer": "2"} for i in range(8)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": f"e{i}", "answer": "3"} for i in range(6)])
    dm = HFPromptDataModule(
        data_files={"train": train, "validation": val},
        val_split="validation",
        test_data_files=test,
        max_train_rows=7,
        max_val_rows=5,
        val_batch_size=4,
    )
    dm.setup("fit")
    assert len(dm.train_rows) == 7 and {r["question"][0] for r in dm.train_rows} == {"t"}
    assert len(dm.val_rows) == 5 and {r["question"][0] for r in dm.val_rows} == {"v"}
    assert not dm.test_rows
    dm.setup("test")
    assert [r["question"] for r in dm.test_rows] == [f"e{i}" for i in range(6)]  # file order
    assert [len(b) for b in dm.test_dataloader()] == [4, 2]


def test_validation_split_equal_to_training_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="validation split is the training split"):
        HFPromptDataModule(path=str(tmp_path / "one.jsonl"), val_split="test")


# ----- offline word problems -----------------------------------------------------------------------------------

EQUATION = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_word_problems_are_deterministic():
    task = WordProblemTask()
    assert task.generate(200, seed=5) == task.generate(200, seed=5)
    assert task.generate(200, seed=5) != task.generate(200, seed=6)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_word_problem_answers_recomputed(steps):
    for problem in WordProblemTask(min_steps=steps, max_steps=steps).generate(300, seed=steps):
        lines = problem.solution.splitlines()
        assert lines[-1] == f"#### {problem.answer}" and TEMPLATES[problem.template][0] == steps
        equations = [EQUATION.search(line) for line in lines[:-1]]
        assert len(equations) == steps and all(equations)
        for eq in equations:
            a, op, b, result = int(eq[1]), eq[2], int(eq[3]), int(eq[4])
            assert APPLY[op](a, b) == result  # exact: divisions leave no remainder
        assert int(equations[-1][4]) == problem.answer >= 0
        operands = {int(eq[i]) for eq in equations for i in (1, 3)}
        assert {int(n) for n in re.findall(r"\d+", problem.question)} <= operands  # it uses the story's numbers


def test_word_problem_heldout_is_disjoint_from_train():
    task = WordProblemTask()
    train, heldout = task.generate(5000, seed=0), task.generate(300, seed=1234, split="heldout")
    assert len({p.question for p in train}) == 5000 and len(heldout) == 300
    assert not {(p.template, p.numbers) for p in train} & {(p.template, p.numbers) for p in heldout}
    assert all(task.is_heldout(p) for p in heldout) and not any(task.is_heldout(p) for p in train)


def test_word_problem_data_module_rows():
    dm = WordProblemDataModule(num_train=64, num_val=10, max_steps=2, batch_size=8, seed=1)
    dm.setup("fit")
    assert len(dm.train_rows) == 64 and len(dm.val_rows) == 10
    row = dm.val_rows[0]
    assert row["prompt"].startswith(row["question"]) and row["solution"].endswith(f"#### {row['answer']}")
    other = WordProblemDataModule(num_train=64, num_val=10, max_steps=2, seed=2)
    other.setup("fit")
    assert other.val_rows == dm.val_rows and other.train_rows != dm.train_rows  # held-out set depends on its own seed
    assert len(next(iter(dm.train_dataloader()))) == 8


def test_written_word_problems_read_back_with_gsm8k_preset(tmp_path):
    path = write_word_problems(tmp_path / "wp.jsonl", 20, seed=0)
    dm = HFPromptDataModule(path=str(path), preset="gsm8k", val_size=5)
    dm.setup("fit")
    expected = {p.question: str(p.answer) for p in WordProblemTask().generate(20, seed=0)}
    assert {r["question"]: r["answer"] for r in all_rows(dm)} == expected
