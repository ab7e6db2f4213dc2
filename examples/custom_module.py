"""The kit's components inside a different LightningModule: REINFORCE with a group baseline, written from scratch.

    python examples/custom_module.py                              # 4 steps on the shipped tiny-arith model
    python examples/custom_module.py --adjuster causal --steps 10
    python examples/custom_module.py --model path/to/hf_model_folder --extra-reward my_rewards.brevity_reward

:class:`GroupReinforce` borrows the group sampler (generation and scoring), the reward plumbing, the data module
and an advantage adjuster from ``gcpo_lightning``, but none of :class:`~gcpo_lightning.GCPOModule`: no clipping,
no reference model, no manual optimisation. The loss is the plain policy gradient
``-mean_i A_i * mean_t log pi(y_{i,t})`` and Lightning's automatic optimisation does the rest.
"""

from __future__ import annotations

import argparse
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from gcpo_lightning import ArithmeticDataModule, CausalAdvantage, GroupNormalizedAdvantage, GroupSampler
from gcpo_lightning.components.graphs.independent import IndependentResponses
from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.interfaces.containers import PolicyModels, Rollout
from gcpo_lightning.interfaces.protocols import RewardAdjuster, RewardFn
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer
from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy
from gcpo_lightning.rewards.base import compute_rewards


class GroupReinforce(L.LightningModule):
    """REINFORCE with a group baseline: sample ``G`` completions per prompt, reward them, push up the good ones.

    Args:
        model_name_or_path: the policy (a shipped name, a local folder or a Hub name).
        reward_funcs: reward functions, summed with weight 1; the first is logged as accuracy.
        adjuster: rewards to advantages; ``GroupNormalizedAdvantage`` gives the group-mean baseline.
        num_generations: ``G``, completions per prompt.
        max_completion_length: new tokens per completion.
        lr: AdamW learning rate.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-arith",
        reward_funcs: list[RewardFn] | None = None,
        adjuster: RewardAdjuster | None = None,
        num_generations: int = 4,
        max_completion_length: int = 48,
        lr: float = 1e-4,
    ) -> None:
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.reward_funcs = reward_funcs or [arithmetic_accuracy]
        self.adjuster = adjuster or GroupNormalizedAdvantage()
        self.graph_builder = IndependentResponses()  # no collider: each answer depends on the prompt alone
        self.sampler = GroupSampler(temperature=1.0, max_completion_length=max_completion_length)
        self.num_generations, self.lr = num_generations, lr
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None

    def configure_model(self) -> None:
        """Load the policy and its (left-padding) tokenizer once."""
        if self.policy is None:
            self.tokenizer = load_tokenizer(self.model_name_or_path)
            self.policy = load_causal_lm(self.model_name_or_path).train()

    def models(self) -> PolicyModels:
        """What the sampler and the graph builder read: the policy, its tokenizer, the temperature."""
        return PolicyModels(policy=self.policy, tokenizer=self.tokenizer, temperature=self.sampler.temperature)

    def rewards(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """``[N]`` summed and ``[N, F]`` per-function rewards; data columns (``answer``) go to the functions."""
        columns = {k: v for k, v in rollout.row_columns().items() if k != "prompt"}
        prompts = [p for p in rollout.prompts for _ in range(rollout.group_size)]
        return compute_rewards(self.reward_funcs, [1.0] * len(self.reward_funcs), prompts, rollout.completions, columns)

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> Tensor:
        """Sample, reward, baseline, and return ``-mean(A * mean-token log-prob)``."""
        models = self.models()
        rollout = self.sampler.sample(models, [row["prompt"] for row in batch], self.num_generations)
        rollout.rows = batch
        rewards, per_func = self.rewards(rollout)  # [N], [N, F]
        graph = self.graph_builder.build(rollout, models, self.sampler)
        adv = self.adjuster.adjust(rewards.to(self.device), rollout, graph).values  # [N]
        logps = score_completions(
            self.policy,
            rollout.prompt_ids,
            rollout.prompt_mask,
            rollout.completion_ids,
            rollout.completion_mask,
            temperature=models.temperature,
        ).logps  # [N, T], with grad
        mask = rollout.completion_mask.float()  # [N, T]
        seq_logp = (logps * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N]
        loss = -(adv.detach() * seq_logp).mean()
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/reward": rewards.mean(),
                "train/accuracy": per_func[:, 0].mean(),
                "train/advantage_abs": adv.abs().mean(),
            },
            prog_bar=True,
            batch_size=len(batch),
        )
        return loss

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Held-out accuracy of one greedy completion per prompt (the first reward function)."""
        rollout = self.sampler.sample(self.models(), [row["prompt"] for row in batch], 1, greedy=True, score=False)
        rollout.rows = batch
        _, per_func = self.rewards(rollout)  # [B, F]
        self.log("val/accuracy", per_func[:, 0].mean(), prog_bar=True, batch_size=len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the policy, without weight decay (so only the policy gradient moves the weights)."""
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=0.0)


@dataclass
class RunResult:
    """The trained module and where its metrics were written."""

    module: GroupReinforce
    log_dir: Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The example's knobs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="tiny-arith", help="a shipped model name, a local folder or a Hub name")
    p.add_argument(
        "--adjuster",
        choices=["group", "causal"],
        default="group",
        help="group: group-normalised advantage; causal: CausalAdvantage on the fork-only graph",
    )
    p.add_argument("--steps", type=int, default=4, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="G, completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=48, help="new tokens per completion")
    p.add_argument("--num-val", type=int, default=16, help="held-out questions scored after the last step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument(
        "--extra-reward",
        action="append",
        default=[],
        metavar="IMPORT.PATH",
        type=pkgutil.resolve_name,
        help="another reward function added after the accuracy; repeatable",
    )
    p.add_argument("--log-dir", type=Path, default=Path("runs/custom_module"), help="CSV logs go here")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> RunResult:
    """Fit :class:`GroupReinforce` for a few steps on the embedded arithmetic task."""
    args = parse_args(argv)
    L.seed_everything(args.seed)
    adjuster = CausalAdvantage(alpha=2.0) if args.adjuster == "causal" else GroupNormalizedAdvantage()
    module = GroupReinforce(
        args.model,
        [arithmetic_accuracy, *args.extra_reward],
        adjuster,
        args.num_generations,
        args.max_completion_length,
        args.lr,
    )
    data = ArithmeticDataModule(
        num_train=max(256, 2 * args.batch_size * args.steps),
        num_val=args.num_val,
        batch_size=args.batch_size,
        val_batch_size=args.num_val,
        seed=args.seed,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        logger=CSVLogger(args.log_dir, name="group_reinforce"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, data)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"GroupReinforce after {trainer.global_step} steps: {metrics} (metrics: {trainer.logger.log_dir})")
    return RunResult(module=module, log_dir=Path(trainer.logger.log_dir))


if __name__ == "__main__":
    main()
