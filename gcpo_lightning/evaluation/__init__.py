"""Held-out evaluation: the sampled-evaluation metric (pass@k, mean@k, majority@k) and per-problem records."""

from gcpo_lightning.evaluation.metric import SampledEvaluation
from gcpo_lightning.evaluation.records import ProblemRecord, read_problem_results

__all__ = ["ProblemRecord", "SampledEvaluation", "read_problem_results"]
