"""Held-out evaluation of a module: scoring the sampled answers, logging pass@k, and per-problem results files.

:class:`HeldOutEvaluation` is the state a :class:`~gcpo_lightning.module.GCPOModule` keeps for validate/test (a
child ``nn.Module``, so its metrics follow the module's device and are synced across ranks);
:class:`ProblemResults` is the callback that writes one JSON line per held-out problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric

from gcpo_lightning.evaluation.metric import SampledEvaluation
from gcpo_lightning.evaluation.records import answer_keys, problem_records, results_path, write_problem_results
from gcpo_lightning.interfaces.containers import Rollout


class HeldOutEvaluation(nn.Module):
    """pass@1 (reported as ``accuracy``), pass@k, mean@k, majority@k and the mean reward over held-out problems.

    Args:
        num_samples: completions per problem (1 is greedy decoding).
        pass_at: the ``k`` values reported as ``pass@k``; default ``(1, num_samples)``.
    """

    def __init__(self, num_samples: int = 1, pass_at: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_samples, self.pass_at = num_samples, pass_at
        self.metric = SampledEvaluation(k=num_samples, ks=pass_at)
        self.reward = MeanMetric()
        self.baseline_accuracy: float | None = None

    def step(self, module: Any, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Answer a batch of held-out problems with ``module``'s sampler (greedy when one sample), score them with
        its reward functions and add them; returns what callbacks read."""
        k = self.num_samples
        rollout = module.sampler.sample(module.models(), module.prompts_for(batch), k, greedy=k == 1, score=False)
        rollout.rows = batch
        rewards, per_func = module.score_rewards(rollout)
        accuracy = module.accuracy_reward
        return self.update(rollout, rewards, per_func[:, accuracy], module.reward_funcs[accuracy])

    def update(self, rollout: Rollout, rewards: Tensor, accuracy: Tensor, accuracy_fn: Any) -> dict[str, Any]:
        """Add one batch: ``[P*k]`` total rewards and accuracy-reward values; returns what callbacks read."""
        k = self.num_samples
        correct = (accuracy > 0.5).view(len(rollout.rows), k)  # [P, k]
        keys = answer_keys(accuracy_fn, rollout.completions, k)
        self.metric.update(correct, keys)
        self.reward.update(rewards)
        return {
            "rows": rollout.rows,
            "completions": rollout.completions,
            "rewards": rewards,
            "correct": correct,
            "keys": keys,
        }

    def compute(self) -> dict[str, float]:
        """The epoch's values (``accuracy`` is pass@1), then reset for the next evaluation."""
        values = {k: v.item() for k, v in self.metric.compute().items()}
        values["accuracy"], values["reward"] = values["pass@1"], self.reward.compute().item()
        self.metric.reset()
        self.reward.reset()
        return values

    def log(self, module: L.LightningModule) -> None:
        """Log the epoch under ``val/`` or ``test/``; the sanity check is the step-0 baseline."""
        values = self.compute()
        trainer = module.trainer
        if trainer.sanity_checking:
            self.baseline_accuracy = values["accuracy"]
            rank_zero_info(f"held-out accuracy before training: {values['accuracy']:.3f}")
            if module.logger is not None:
                module.logger.log_metrics({f"val/{k}": v for k, v in values.items()}, step=0)
            return
        prefix = "test" if trainer.testing else "val"
        accuracy = values.pop("accuracy")
        module.log(f"{prefix}/accuracy", accuracy, prog_bar=True)
        module.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        before = f" (before training: {self.baseline_accuracy:.3f})" if self.baseline_accuracy is not None else ""
        rank_zero_info(f"held-out accuracy ({prefix}) at step {module.global_step}: {accuracy:.3f}{before}")


class ProblemResults(L.Callback):
    """Writes one JSON line per held-out problem at every validation and test (a new file each time).

    Args:
        path: the file; ``{stage}`` and ``{step}`` are filled in (e.g. ``runs/eval/{stage}_{step}.jsonl``), and
            ``.rank<r>`` is added with several ranks.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.written = 0  # index of the next record of the current evaluation

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Append the batch's records (a new file, indices from 0, at the first batch)."""
        stage = "test" if trainer.testing else "val"
        path = results_path(self.path, stage, trainer.global_step, trainer.global_rank, trainer.world_size)
        if batch_idx == 0:
            self.written = 0
        evaluation = pl_module.evaluation
        records = problem_records(
            outputs["rows"],
            outputs["completions"],
            outputs["rewards"],
            outputs["correct"],
            outputs["keys"],
            ks=evaluation.metric.ks,
            majority_k=evaluation.num_samples,
            start_index=self.written,
        )
        self.written += len(outputs["rows"])
        write_problem_results(path, records, append=batch_idx > 0)

    on_test_batch_end = on_validation_batch_end
