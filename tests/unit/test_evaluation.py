"""Sampled-evaluation metrics: pass@k estimator, majority voting, the accumulating metric and the JSONL writer."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from gcpo_lightning.evaluation.metric import SampledEvaluation
from gcpo_lightning.evaluation.records import (
    ProblemRecord,
    problem_records,
    read_problem_results,
    write_problem_results,
)
from gcpo_lightning.functional.pass_at_k import majority_correct, pass_at_k_tensor


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)`` with exact big-int binomials and one final division."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


def row(correct_positions: list[int], n: int) -> list[bool]:
    return [i in correct_positions for i in range(n)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The estimator for one problem with ``c`` of ``n`` samples correct (the first ``c``)."""
    return pass_at_k_tensor(torch.tensor([row(list(range(c)), n)]), k).item()


# ----- pass@k ------------------------------------------------------------------------------------------------------


def test_pass_at_k_hand_computed():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=10, c=0: C(10,k)/C(10,k) = 1, so pass@k = 0 for every k
    assert all(pass_at_k(10, 0, k) == 0.0 for k in range(1, 11))
    # c=n: C(0,k) = 0, so pass@k = 1
    assert all(pass_at_k(6, 6, k) == 1.0 for k in range(1, 7))
    # n-c < k: every k-subset holds a correct sample (n=5, c=3, k=3: C(2,3) = 0)
    assert pass_at_k(5, 3, 3) == 1.0
    # k=1: 1 - C(n-c,1)/C(n,1) = 1 - (n-c)/n = c/n
    for n in range(1, 9):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_matches_the_closed_form_on_a_grid():
    for n in (*range(1, 17), 20, 32, 50, 64, 100):
        # every c of a problem at once: row c has its first c samples correct
        correct = torch.arange(n).unsqueeze(0) < torch.arange(n + 1).unsqueeze(1)  # [n + 1, n]
        for k in sorted({min(j, n) for j in (1, 2, 3, n // 4 or 1, n // 2 or 1, n - 1 or 1, n)}):
            expected = torch.tensor([closed_form_pass_at_k(n, c, k) for c in range(n + 1)], dtype=torch.float64)
            got = pass_at_k_tensor(correct, k)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15, msg=f"n={n}, k={k}")
            assert got[0].item() == 0.0 and got[n - k + 1 :].eq(1.0).all(), (n, k)  # exact at both ends


def test_pass_at_k_numerically_stable_for_large_n():
    n, c, k = 200, 3, 100
    exact = closed_form_pass_at_k(n, c, k)
    correct = torch.tensor([row([0, 5, 9], n)])
    assert pass_at_k_tensor(correct, k).item() == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n, k", [(3, 4), (3, 0), (0, 1)])
def test_pass_at_k_rejects_bad_arguments(n: int, k: int):
    with pytest.raises(ValueError):
        pass_at_k_tensor(torch.zeros(2, n, dtype=torch.bool), k)


def test_pass_at_k_takes_numbers_and_checks_its_shape():
    torch.manual_seed(0)
    correct = torch.rand(40, 7) < torch.rand(40, 1)  # [P, n], varied success rates
    for k in range(1, 8):
        expected = [closed_form_pass_at_k(7, int(c), k) for c in correct.sum(-1)]
        torch.testing.assert_close(pass_at_k_tensor(correct, k), torch.tensor(expected, dtype=torch.float64))
    # numbers work too (non-zero = correct)
    torch.testing.assert_close(pass_at_k_tensor(correct.float(), 3), pass_at_k_tensor(correct, 3))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_tensor(correct, 8)
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        pass_at_k_tensor(correct[0], 1)


# ----- majority@k --------------------------------------------------------------------------------------------------


def test_majority_correct_votes_ties_and_none():
    answers = [
        ["1", "2", "2", "3"],  # "2" wins 2-1-1; its samples are correct
        ["1", "2", "2", "1"],  # tie 2-2: "1" appears first and wins; it is wrong
        ["2", "1", "1", "2"],  # tie 2-2: "2" appears first and wins; it is right
        [None, None, "5", None],  # None never votes: "5" wins; it is right
        [None, None, None, None],  # nothing extracted: incorrect
        ["7", "7", "7", "8"],  # "7" wins, wrong
    ]
    correct = torch.tensor(
        [
            [False, True, True, False],
            [False, True, True, False],
            [True, False, False, True],
            [False, False, True, False],
            [False, False, False, False],
            [False, False, False, True],
        ]
    )
    torch.testing.assert_close(majority_correct(answers, correct, 4), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]))


def test_majority_correct_uses_only_first_k():
    answers = [["1", "2", "2", "2"]]
    correct = torch.tensor([[True, False, False, False]])
    assert majority_correct(answers, correct, 4).item() == 0.0  # "2" wins 3-1
    assert majority_correct(answers, correct, 1).item() == 1.0  # only "1" votes
    assert majority_correct(answers, correct, 2).item() == 1.0  # tie 1-1, "1" first
    with pytest.raises(ValueError):
        majority_correct(answers, correct, 5)
    with pytest.raises(ValueError, match="answers for 2 problems"):
        majority_correct(answers * 2, correct, 1)


# ----- the metric --------------------------------------------------------------------------------------------------


def make_batch(seed: int, problems: int, n: int) -> tuple[torch.Tensor, list[list[str | None]]]:
    """Random correctness with answer keys consistent with it ("42" is right; wrong answers vary or are None)."""
    g = torch.Generator().manual_seed(seed)
    correct = torch.rand(problems, n, generator=g) < torch.rand(problems, 1, generator=g)
    wrong = torch.randint(0, 4, (problems, n), generator=g).tolist()
    answers = [
        ["42" if ok else (None if w == 0 else str(w)) for ok, w in zip(c, ws)] for c, ws in zip(correct.tolist(), wrong)
    ]
    return correct, answers


def test_metric_values_on_a_hand_checked_batch():
    metric = SampledEvaluation(k=4, ks=(1, 2, 4))
    correct = torch.tensor([[True, False, False, True], [False, False, False, False]])
    metric.update(correct, [["3", "2", None, "3"], [None] * 4])
    out = {name: v.item() for name, v in metric.compute().items()}
    # problem 0: c=2, n=4: pass@1 = 0.5, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1; problem 1: all 0
    assert out == pytest.approx({"pass@1": 0.25, "pass@2": 5 / 12, "pass@4": 0.5, "mean@4": 0.25, "majority@4": 0.5})


def test_metric_two_updates_equal_one_update_on_the_concatenation():
    (c1, a1), (c2, a2) = make_batch(1, 5, 8), make_batch(2, 3, 8)
    split, whole = SampledEvaluation(k=4, ks=(1, 2, 8)), SampledEvaluation(k=4, ks=(1, 2, 8))
    split.update(c1, a1)
    split.update(c2, a2)
    whole.update(torch.cat([c1, c2]), a1 + a2)
    got, expected = split.compute(), whole.compute()
    assert set(got) == {"pass@1", "pass@2", "pass@8", "mean@4", "majority@4"}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])
    # pass@1 is the mean over all n samples; mean@4 over the first 4 only
    allc = torch.cat([c1, c2]).double()
    torch.testing.assert_close(got["pass@1"], allc.mean())
    torch.testing.assert_close(got["mean@4"], allc[:, :4].mean())


def test_metric_mean_at_k_equals_pass_at_1_when_n_is_k():
    correct, answers = make_batch(3, 6, 4)
    metric = SampledEvaluation(k=4)
    metric.update(correct, answers)
    out = metric.compute()
    assert set(out) == {"pass@1", "pass@4", "mean@4", "majority@4"}
    torch.testing.assert_close(out["mean@4"], out["pass@1"])


def test_metric_majority_only_with_answer_keys_and_over_those_problems():
    metric = SampledEvaluation(k=2)
    correct = torch.tensor([[True, True], [False, False]])
    metric.update(correct)
    assert "majority@2" not in metric.compute()
    metric.update(torch.tensor([[True, False]]), [["1", "2"]])  # tie: "1" first, right
    out = metric.compute()
    assert out["majority@2"].item() == 1.0  # averaged over the one problem with keys
    assert out["pass@1"].item() == pytest.approx(1.5 / 3)


def test_metric_reset_and_rejects_too_few_samples():
    metric = SampledEvaluation(k=4)
    correct, answers = make_batch(4, 3, 4)
    metric.update(correct, answers)
    first = metric.compute()
    metric.reset()
    assert metric.problems.item() == 0 and metric.majority_problems.item() == 0
    metric.update(correct, answers)
    for name, value in metric.compute().items():
        torch.testing.assert_close(value, first[name])
    with pytest.raises(ValueError, match="fewer than k"):
        metric.update(correct[:, :3])
    with pytest.raises(ValueError):
        SampledEvaluation(k=0)


def test_metric_forward_returns_batch_values_and_accumulates():
    metric = SampledEvaluation(k=2)
    batch = metric(torch.tensor([[True, False]]), [["1", "2"]])
    assert batch["pass@1"].item() == 0.5 and batch["majority@2"].item() == 1.0
    metric(torch.tensor([[False, False]]), [["1", None]])
    assert metric.compute()["pass@2"].item() == 0.5


# ----- per-problem JSONL -------------------------------------------------------------------------------------------


def test_problem_records_and_jsonl_round_trip(tmp_path):
    rows = [{"prompt": "Q: 1+1?", "answer": "2", "question": "1+1"}, {"prompt": "Q: 2+2?", "answer": "4"}]
    completions = ["Answer: 2", "Answer: 3", "Answer: 5", "no idea ü"]
    correct = torch.tensor([[True, False], [False, False]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    answers = [["2", "3"], ["5", None]]
    records = problem_records(rows, completions, rewards, correct, answers, ks=(1, 2), majority_k=2, start_index=10)
    assert [r.index for r in records] == [10, 11]
    assert records[0].completions == ["Answer: 2", "Answer: 3"] and records[1].extracted == ["5", None]
    assert records[0].pass_at == {"pass@1": 0.5, "pass@2": 1.0} and records[1].pass_at == {"pass@1": 0.0, "pass@2": 0.0}
    assert records[0].majority is True and records[1].majority is False  # tie "2"/"3": "2" first
    assert records[0].question == "1+1" and records[1].question is None

    path = tmp_path / "new" / "dir" / "problems.jsonl"
    write_problem_results(path, records)
    assert read_problem_results(path) == records
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["completions"][1] == "no idea ü"

    write_problem_results(path, records[:1])  # append (default)
    assert read_problem_results(path) == records + records[:1]
    write_problem_results(path, records[1:], append=False)  # overwrite
    assert read_problem_results(path) == records[1:]


def test_problem_record_to_dict_is_json_serialisable():
    record = ProblemRecord(index=0, prompt="p", answer=3, completions=["c"], rewards=[0.5], correct=[False])
    assert json.loads(json.dumps(record.to_dict()))["pass_at"] == {}
