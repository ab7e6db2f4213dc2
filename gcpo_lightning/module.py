"""The system: one LightningModule that wires the components of a GRPO/GCPO step and does nothing else.

``training_step`` is the numbered algorithm of ``docs/algorithm.md``; each step is a component (``interfaces``):
models come from the :class:`PolicyBuilder`, the maths from ``functional``, the run's bookkeeping (random
states, completion tables, per-problem results) from callbacks (``configure_callbacks``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage
from gcpo_lightning.components.aggregation import LossAggregation, SequenceMean
from gcpo_lightning.components.graphs.independent import IndependentResponses
from gcpo_lightning.components.penalties.reference_kl import ReferenceKL
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.evaluation.evaluator import HeldOutEvaluation, ProblemResults
from gcpo_lightning.functional.clock import timed, wall_time
from gcpo_lightning.interfaces.containers import PenaltyInputs, PolicyModels, Rollout
from gcpo_lightning.interfaces.protocols import (
    CausalGraphBuilder,
    ProjectedKL,
    RewardAdjuster,
    RewardFn,
    Sampler,
    release_sampler_memory,
)
from gcpo_lightning.policy.builder import PolicyBuilder
from gcpo_lightning.policy.sharding import full_parameters
from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy
from gcpo_lightning.rewards.base import rollout_rewards
from gcpo_lightning.training.checks import check_data, check_fits, needs_rollout_scores, settings_errors
from gcpo_lightning.training.completions import CompletionsTable
from gcpo_lightning.training.distributed import check_strategy, gather_across_ranks
from gcpo_lightning.training.hparams import RebuildsComponents
from gcpo_lightning.training.metrics import StepLogger
from gcpo_lightning.training.state import RandomStateCheckpoint, SkipCounter
from gcpo_lightning.training.update import micro_batch_loss, update_policy

COMPONENTS = ("policy_builder", "sampler", "graph_builder", "adjuster", "kl", "loss", "reward_funcs")
"""Init arguments that are components: saved as their configs, so that a checkpoint rebuilds them."""


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with the paper's weight decay (0.01) and a learning rate suited to the embedded tiny model."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


class GCPOModule(RebuildsComponents, L.LightningModule):
    """Group-based RL post-training (GRPO, and GCPO with the causal components) of a causal language model.

    Args:
        policy_builder: builds the policy, its tokenizer and the frozen reference (model path, LoRA, 4-bit, FSDP2
            mixed precision, gradient checkpointing, chat template, chunked log-probs).
        reward_funcs: reward functions ``fn(prompts, completions, **columns) -> list[float]``; default: the
            embedded task's accuracy.
        reward_weights: one weight per reward function (default 1.0 each).
        accuracy_reward: index of the reward function whose value (1 = right) is reported as accuracy.
        sampler: generates and scores the groups (temperature, top-p, max completion length, backend).
        graph_builder: builds each group's causal structure; ``IndependentResponses`` is GRPO.
        adjuster: rewards to advantages; ``GroupNormalizedAdvantage`` is GRPO.
        kl: the per-token penalty; ``ReferenceKL`` is GRPO's beta-KL (no reference is built when beta is 0).
        loss: how per-token losses are aggregated (TRL's ``loss_type``): ``SequenceMean`` (``grpo``, the paper),
            ``TokenMean`` (``dapo``) or ``ConstantNormalizer`` (``dr_grpo``).
        num_generations: ``G``, completions per prompt (at least 2).
        num_iterations: optimisation passes over each rollout (TRL's ``num_iterations``, PPO epochs).
        mini_batch_size: completions per optimiser step (a multiple of ``G`` dividing ``batch_size * G``);
            ``None`` makes one step per pass over the whole rollout.
        micro_batch_size: completions per forward/backward pass; gradients of the micro-batches are accumulated
            into one optimiser step (same result, less memory). ``None``: the whole mini-batch at once.
        micro_batch_tokens: the most tokens one forward/backward pass may hold, counted as rows x the padded length
            of the longest sequence the pass reads: prompt + completion, and for the paper's causal KL the context
            ``x_i`` + completion (about ``G`` completions long). Micro-batches shrink to fit (at least one row, at
            most ``micro_batch_size``); the gradient is the same. ``None``: ``micro_batch_size`` alone.
        epsilon: lower clip range of the importance ratio.
        epsilon_high: upper clip range (``None``: equal to ``epsilon``; DAPO uses 0.28).
        optimizer: builds the optimizer from the policy's trainable parameters.
        lr_scheduler: optionally builds a scheduler, stepped after every optimiser step.
        max_grad_norm: gradient clipping norm; ``None`` disables clipping.
        max_consecutive_skips: steps in a row with a non-finite loss or gradient before training stops.
        log_completions_every_n_steps: how often a table of sample completions is written (0: never).
        num_completions_to_log: rows of that table.
        eval_num_samples: completions per held-out problem in validate/test (and validation during fit): 1 is
            greedy decoding; more are sampled with the sampler's settings and give pass@k, mean@k, majority@k.
        eval_pass_at: the ``k`` values reported as ``pass@k`` (unbiased estimator); default ``(1, eval_num_samples)``.
        eval_results_path: write one JSON line per held-out problem here (``{stage}`` and ``{step}`` are filled
            in, e.g. ``runs/eval/{stage}_{step}.jsonl``); ``None``: no file.
    """

    def __init__(
        self,
        policy_builder: PolicyBuilder = lazy_instance(PolicyBuilder),
        reward_funcs: list[RewardFn] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_reward: int = 0,
        sampler: Sampler = lazy_instance(GroupSampler),
        graph_builder: CausalGraphBuilder = lazy_instance(IndependentResponses),
        adjuster: RewardAdjuster = lazy_instance(GroupNormalizedAdvantage),
        kl: ProjectedKL = lazy_instance(ReferenceKL),
        loss: LossAggregation = lazy_instance(SequenceMean),
        num_generations: int = 8,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        micro_batch_tokens: int | None = None,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        max_consecutive_skips: int = 10,
        log_completions_every_n_steps: int = 10,
        num_completions_to_log: int = 8,
        eval_num_samples: int = 1,
        eval_pass_at: list[int] | None = None,
        eval_results_path: str | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_builder = policy_builder
        if policy_builder.saves_adapters_only:
            self.strict_loading = False  # QLoRA checkpoints hold the adapters only
        self.reward_funcs = list(reward_funcs) if reward_funcs is not None else [arithmetic_accuracy]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.accuracy_reward = accuracy_reward
        self.sampler, self.graph_builder, self.adjuster, self.kl, self.loss = sampler, graph_builder, adjuster, kl, loss
        self.num_generations, self.num_iterations = num_generations, num_iterations
        self.mini_batch_size, self.micro_batch_size = mini_batch_size, micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_completions_to_log = num_completions_to_log
        self.eval_num_samples, self.eval_pass_at = eval_num_samples, eval_pass_at
        self.eval_results_path = eval_results_path
        self.max_consecutive_skips = max_consecutive_skips
        errors = settings_errors(self)  # PolicyBuilder checks its own settings when built
        if errors:
            raise ValueError("GCPOModule: " + "; ".join(errors))
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: list[Any] = []  # a list keeps it out of state_dict and parameters()
        self.skips = SkipCounter(max_consecutive_skips)
        self.evaluation = HeldOutEvaluation(eval_num_samples, eval_pass_at)
        self.step_logger = StepLogger()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *COMPONENTS])
        self.save_component_configs(COMPONENTS)

    # ----- set-up: checks, models, callbacks -------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Check the strategy, and the data against the settings, once they are set up and before the model loads."""
        check_strategy(self.trainer.strategy)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            check_data(self, dm, stage)

    def configure_model(self) -> None:
        """Build the policy (and the frozen reference when the penalty needs one) once."""
        if self.policy is not None:
            return
        built = self.policy_builder.build(self.kl.needs_reference, self.device, self._device_mesh)
        self.policy, self.tokenizer = built.policy, built.tokenizer
        self._reference = [] if built.reference is None else [built.reference]

    def configure_callbacks(self) -> list[L.Callback]:
        """The run's bookkeeping: random states in checkpoints, completion tables, per-problem results."""
        callbacks: list[L.Callback] = [RandomStateCheckpoint()]
        if self.log_completions_every_n_steps:
            callbacks.append(CompletionsTable(self.log_completions_every_n_steps, self.num_completions_to_log))
        if self.eval_results_path:
            callbacks.append(ProblemResults(self.eval_results_path))
        return callbacks

    @property
    def built_policy(self) -> torch.nn.Module:
        """The policy; raises if ``configure_model`` has not built it yet."""
        if self.policy is None:
            raise RuntimeError("GCPOModule: the policy is not built yet (configure_model builds it)")
        return self.policy

    @property
    def reference(self) -> Any | None:
        """The frozen reference model, or ``None`` when the penalty does not need one."""
        return self._reference[0] if self._reference else None

    def models(self) -> PolicyModels:
        """The models bundle handed to components."""
        return PolicyModels(
            self.policy,
            self.tokenizer,
            self.reference,
            self.sampler.temperature or 1.0,
            self.render,
            self.policy_builder.logits_chunk_size,
        )

    def render(self, text: str) -> str:
        """``text`` as fed to the model (chat template applied where used)."""
        return self.policy_builder.render(self.tokenizer, text)

    def on_fit_start(self) -> None:
        """Move the reference next to the policy, seed each rank apart, and let the graph builder check lengths."""
        self.on_validation_start()
        if self.trainer.world_size > 1:  # independent sampling noise per rank; a resume restores each rank's own
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        check_fits(self, getattr(self.trainer, "datamodule", None))

    def on_validation_start(self) -> None:
        """Move the reference next to the policy (it is not a registered submodule)."""
        if self.reference is not None:
            self.reference.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Skip counters; with a 4-bit base (QLoRA) only the trainable adapters (the base is rebuilt on load)."""
        checkpoint["state_dict"] = self.policy_builder.checkpoint_state(checkpoint["state_dict"], self.built_policy)
        checkpoint["gcpo_counters"] = self.skips.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the models when loading outside a Trainer, check QLoRA adapters, restore the skip counters."""
        if any(k.startswith("policy.") for k in checkpoint.get("state_dict", {})):
            self.configure_model()  # outside a Trainer (load_from_checkpoint); a no-op when already built
            self.policy_builder.check_checkpoint(checkpoint["state_dict"], self.built_policy)
        self.skips.load_state_dict(checkpoint.get("gcpo_counters", {}))

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) built from the injected factories."""
        opt = self.optimizer_factory([p for p in self.built_policy.parameters() if p.requires_grad])  # LoRA: adapters
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ----- the training step (docs/algorithm.md) ---------------------------------------------------------------

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> dict[str, Any]:
        """1 sample and score, 2 reward, 3 causal graph, 4 advantages, 5 penalty inputs, 6 clipped updates."""
        metrics: dict[str, float] = {}
        models, start = self.models(), wall_time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with full_parameters(self.built_policy):  # FSDP: gather once for the whole no-grad rollout phase
            score = needs_rollout_scores(self, len(batch))  # 1
            rollout = self.sampler.sample(models, self.prompts_for(batch), self.num_generations, score=score)
            rollout.rows = batch
            with timed(metrics, "rewards"):  # 2
                rewards, per_func = self.score_rewards(rollout)
            with timed(metrics, "graph"):  # 3
                graph = self.graph_builder.build(rollout, models, self.sampler)
            release_sampler_memory(self.sampler)  # generation is over for this step (vLLM's sleep mode)
            batch_rewards = gather_across_ranks(rewards)  # [W*N]: every rank's rewards
            advantages = self.adjuster.adjust(rewards, rollout, graph, batch_rewards=batch_rewards)  # 4
            with timed(metrics, "reference"):  # 5
                prepared = self.kl.prepare(rollout, graph, models)
        with timed(metrics, "update"):  # 6
            metrics.update(update_policy(self, rollout, advantages, prepared, models))
        metrics.update(rollout.metrics, **graph.metrics, **advantages.metrics, skipped_steps=float(self.skips.total))
        metrics["timing/step"] = wall_time() - start
        if self.device.type == "cuda":  # the step's high-water mark of tensors on this GPU
            metrics["memory/cuda_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.step_logger.log(self, rollout, batch_rewards, gather_across_ranks(per_func), metrics)
        return {"rollout": rollout, "rewards": batch_rewards[: len(rollout.completions)], "step": self.global_step}

    def prompts_for(self, rows: list[dict[str, Any]]) -> list[str]:
        """The rows' prompts as fed to the model (chat template applied where used)."""
        return [self.render(r["prompt"]) for r in rows]

    def score_rewards(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """``[N]`` total and ``[N, F]`` per-function rewards of the rollout's completions, on this device."""
        total, per_func = rollout_rewards(self.reward_funcs, self.reward_weights, rollout)
        return total.to(self.device), per_func.to(self.device)

    def compute_loss(
        self, mb: Rollout, adv: Tensor, prepared: PenaltyInputs, models: PolicyModels
    ) -> tuple[Tensor, dict]:
        """``-J`` on a micro-batch under the current policy (paper Eq. 10, 12), and its statistics."""
        return micro_batch_loss(self, mb, adv, prepared, models)

    # ----- held-out evaluation ---------------------------------------------------------------------------------

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> dict[str, Any]:
        """``eval_num_samples`` completions per held-out problem (greedy when 1), scored by the reward functions."""
        with full_parameters(self.built_policy):
            return self.evaluation.step(self, batch)

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        """Log pass@1 (as ``accuracy``), pass@k, mean@k and majority@k; the sanity check is the step-0 baseline."""
        self.evaluation.log(self)

    on_test_epoch_end = on_validation_epoch_end
