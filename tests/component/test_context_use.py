"""The context-use diagnostic: rates on a scripted model, counted by hand; the command on the embedded model."""

from __future__ import annotations

import json
import math
import re

import pytest

from gcpo_lightning.evaluation.context_use import (
    ContextUseSettings,
    majority_answer,
    measure_context_use,
    mode_answers,
    side_by_side,
)
from gcpo_lightning.evaluation.context_use_command import arithmetic_answer, main, math_answer, read_problems

# A scripted model: what it writes depends only on the prompt, n and greedy. Candidates, integrated outputs and
# context outputs are given by their answers. Candidate lines are rendered "[index] Answer: a", so the context
# for candidate i is recognised by the missing "[i+1]".
CANDIDATES = {"1+4": [5, 3, 3, 3], "2+2": [4, 4, 6, 6]}  # G = 4
FRESH = {"1+4": [5, 5], "2+2": [6, 4]}  # K = 2 fresh samples under q
INTEGRATED = {"1+4": 5, "2+2": 6}  # M = 1 sampled integrated output
GREEDY = {"1+4": 3, "2+2": 6}
CONTEXT_OUT = {("1+4", 0): [5, 3], ("1+4", 1): [5, 5], ("2+2", 0): [6, 6], ("2+2", 1): [6, 4]}


def texts(answers: list[int]) -> list[str]:
    return [f" Answer: {a}" for a in answers]


def scripted(prompts: list[str], n: int, greedy: bool) -> list[str]:
    out: list[str] = []
    for p in prompts:
        q = re.match(r"Problem: (\S+)\n", p).group(1)
        if "Now write your own solution" in p:
            i = next(i for i in range(4) if f"[{i + 1}]" not in p)
            got = texts(CONTEXT_OUT[(q, i)])
        elif "Candidate solutions" in p:
            got = texts([GREEDY[q] if greedy else INTEGRATED[q]])
        else:
            got = texts(CANDIDATES[q] if n == 4 else FRESH[q])
        assert len(got) == n, (p, n)
        out += got
    return out


def test_rates_on_a_scripted_model_match_hand_counts() -> None:
    settings = ContextUseSettings(group=4, integrated=1, contexts=2, samples=2)
    report = measure_context_use(scripted, [("1+4", 5), ("2+2", 4)], arithmetic_answer, settings)
    rates = {k: (r.hits, r.n) for k, r in report.rates.items()}
    # fresh under q: 1+4 -> 5,5 (2 right); 2+2 -> 6,4 (1 right): 3 of 4.
    assert rates["accuracy_q"] == (3, 4)
    # 1+4: combined 5 is right; its two contexts' outputs 5,3 | 5,5 -> 3 of 4 right; the fresh 5,5 per context: 4/4.
    assert rates["x/right"] == (3, 4) and rates["q/right"] == (4, 4)
    # 2+2: combined 6 is wrong; outputs 6,6 | 6,4 -> 1 of 4 right; fresh 6,4 per context -> 2 of 4.
    assert rates["x/wrong"] == (1, 4) and rates["q/wrong"] == (2, 4)
    # 1+4, i=0: no other candidate (3,3,3) gives 5: outputs 5,3 give 5 once; fresh 5,5 twice.
    assert rates["x/follow_inconsistent"] == (1, 2) and rates["q/follow_inconsistent"] == (2, 2)
    # corroborated: 1+4 i=1 (others 5,3,3): 5,5 | fresh 5,5; 2+2 i=0 and i=1 (4,6,6): 6,6 | 6,4 and 6,4 | 6,4.
    assert rates["x/follow_consistent"] == (2 + 2 + 1, 6) and rates["q/follow_consistent"] == (2 + 1 + 1, 6)
    # the wrong combined 6 (two contexts of 2+2): 6,6,6 of 6,6,6,4 under x; fresh 6,4 gives it once per context.
    assert rates["x/copy_wrong"] == (3, 4) and rates["q/copy_wrong"] == (2, 4)
    # candidates 5,3,3,3 (1 right) and 4,4,6,6 (2 right); majority: 3 (wrong), tie 4/6 -> first seen 4 (right).
    assert rates["single"] == (3, 8)
    assert rates["majority"] == (1, 2)
    assert rates["integrated_sampled"] == (1, 2)
    assert rates["integrated_greedy"] == (0, 2)
    table = side_by_side({"m": report})
    assert "| gives a wrong combined answer | 75.0% (n=4) | 50.0% (n=4) |" in table
    assert "| one candidate | 37.5% (n=8) |" in table


def test_modes_and_majority_handle_ties_and_missing_answers() -> None:
    assert mode_answers([3, 5, None, 5, 3]) == {3, 5}
    assert mode_answers([None, None]) == set()
    assert majority_answer([3, 5, None, 5, 3]) == 3  # tie: the first seen
    assert majority_answer([None, 7, 7, 2]) == 7
    assert majority_answer([None]) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"group": 1}, "group must be >= 2"), ({"samples": 0}, "samples must be >= 1"), ({"contexts": 9}, "contexts")],
)
def test_settings_reject_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ContextUseSettings(**kwargs)


def test_answers_are_read_as_the_rewards_read_them() -> None:
    assert arithmetic_answer(" 7+5=12. Answer: -3") == -3
    assert arithmetic_answer(" Answer: 3 apples") is None
    assert math_answer("so \\boxed{1,000}") == "1000"


def test_problem_file_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: row has no column 'answer'"):
        read_problems(path, "question", "answer", int, 5)
    path.write_text('{"question": "1+1", "answer": "two"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: answer 'two' cannot be read"):
        read_problems(path, "question", "answer", int, 5)


def test_command_on_the_embedded_model_counts_every_output(tmp_path, capsys) -> None:
    out = tmp_path / "rates.json"
    args = ["--model", "gcpo_lightning/assets/tiny-arith", "--n", "3", "--group", "3", "--integrated", "2"]
    assert main([*args, "--contexts", "2", "--samples", "2", "--max-new-tokens", "40", "--json", str(out)]) == 0
    assert "| majority vote over the G candidates |" in capsys.readouterr().out
    rates = json.loads(out.read_text())["gcpo_lightning/assets/tiny-arith"]
    assert rates["single"]["n"] == 3 * 3 and rates["accuracy_q"]["n"] == 3 * 2
    assert rates["integrated_sampled"]["n"] == 3 * 2 and rates["integrated_greedy"]["n"] == 3
    # every context output is counted once as right-or-wrong combined (3 questions x 2 contexts x M=2 x K=2), and
    # so is every fresh sample paired with a context
    for side in ("x", "q"):
        assert rates[f"{side}/right"]["n"] + rates[f"{side}/wrong"]["n"] == 24
        follow = rates[f"{side}/follow_consistent"]["n"] + rates[f"{side}/follow_inconsistent"]["n"]
        assert follow <= 24 and rates[f"{side}/copy_wrong"]["n"] == rates[f"{side}/wrong"]["n"] - (24 - follow)
    for rate in rates.values():
        assert rate["n"] == 0 or 0.0 <= rate["value"] <= 1.0
        assert rate["n"] > 0 or math.isnan(rate["value"])


def test_command_rejects_bad_input_before_loading_a_model(tmp_path, capsys) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text('{"question": "1+1"}\n')
    assert main(["--model", "tiny-arith", "--data", str(data)]) == 2
    assert "p.jsonl:1: row has no column 'answer'" in capsys.readouterr().err
    assert main(["--model", "tiny-arith", "--model", str(tmp_path / "none")]) == 2
    assert f"--model '{tmp_path / 'none'}': no such folder" in capsys.readouterr().err
    assert main(["--model", "tiny-arith", "--contexts", "9"]) == 2
    assert "contexts (9) must be <= group (8)" in capsys.readouterr().err
