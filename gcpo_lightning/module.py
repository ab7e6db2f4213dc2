"""The system: one LightningModule that wires the components of a GRPO/GCPO step.

One training step (docs/algorithm.md numbers these):

1. sample ``G`` completions per prompt and score them under the rollout policy (:class:`Sampler`);
2. score them with the reward functions;
3. build each group's causal graph (:class:`CausalGraphBuilder`);
4. turn rewards into advantages (:class:`RewardAdjuster`);
5. prepare the penalty (reference and causal log-probs, :class:`ProjectedKL`);
6. ``num_iterations`` passes over the rollout in mini-batches of clipped-surrogate updates.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from gcpo_lightning.advantages import GroupNormalizedAdvantage, frac_zero_std
from gcpo_lightning.completions_table import completions_table, write_completions
from gcpo_lightning.containers import Advantages, Penalty, PolicyModels, Rollout, Scores
from gcpo_lightning.graph import IndependentResponses
from gcpo_lightning.kl import ReferenceKL, masked_mean
from gcpo_lightning.losses import LOSS_TYPES, clip_fractions, policy_loss
from gcpo_lightning.models import load_causal_lm, load_tokenizer, render_prompt
from gcpo_lightning.protocols import CausalGraphBuilder, ProjectedKL, RewardAdjuster, RewardFn, Sampler
from gcpo_lightning.rewards import arithmetic_accuracy, compute_rewards, reward_name
from gcpo_lightning.sampling import GroupSampler
from gcpo_lightning.scoring import score_completions

LossType = Literal["grpo", "dapo", "dr_grpo"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with the paper's weight decay (0.01) and a learning rate suited to the embedded tiny model."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def unique_names(names: list[str]) -> list[str]:
    """``names`` with ``_<index>`` appended to every name that occurs more than once."""
    return [f"{n}_{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


@contextmanager
def timed(metrics: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``metrics[f"timing/{name}"]``."""
    start = time.perf_counter()
    yield
    metrics[f"timing/{name}"] = metrics.get(f"timing/{name}", 0.0) + time.perf_counter() - start


class GCPOModule(L.LightningModule):
    """Group-based RL post-training (GRPO, and GCPO with the causal components) of a causal language model.

    Args:
        model_name_or_path: the policy: a shipped model (``tiny-arith``), ``smollm2-135m-instruct``, a local
            folder or a Hugging Face Hub name, loaded with ``from_pretrained``.
        model_kwargs: keyword arguments for ``from_pretrained`` (e.g. ``dtype``, ``attn_implementation``).
        reward_funcs: reward functions ``fn(prompts, completions, **columns) -> list[float]``; default: the
            embedded task's accuracy.
        reward_weights: one weight per reward function (default 1.0 each).
        accuracy_reward: index of the reward function whose value (1 = right) is reported as accuracy.
        sampler: generates and scores the groups (temperature, top-p, max completion length).
        graph_builder: builds each group's causal structure; ``IndependentResponses`` is GRPO.
        adjuster: rewards to advantages; ``GroupNormalizedAdvantage`` is GRPO.
        kl: the per-token penalty; ``ReferenceKL`` is GRPO's beta-KL (no reference is built when beta is 0).
        num_generations: ``G``, completions per prompt (at least 2).
        num_iterations: optimisation passes over each rollout (TRL's ``num_iterations``, PPO epochs).
        mini_batch_size: completions per optimiser step (a multiple of ``G`` dividing ``batch_size * G``);
            ``None`` makes one step per pass over the whole rollout.
        micro_batch_size: completions per forward/backward pass; gradients of the micro-batches are accumulated
            into one optimiser step (same result, less memory). ``None``: the whole mini-batch at once.
        epsilon: lower clip range of the importance ratio.
        epsilon_high: upper clip range (``None``: equal to ``epsilon``; DAPO uses 0.28).
        loss_type: ``grpo`` (sequence mean then group mean, the paper), ``dapo`` (token mean) or ``dr_grpo``
            (sum over a constant ``N * max_completion_length``).
        optimizer: builds the optimizer from the policy's parameters.
        lr_scheduler: optionally builds a scheduler, stepped after every optimiser step.
        max_grad_norm: gradient clipping norm; ``None`` disables clipping.
        max_consecutive_skips: steps in a row with a non-finite loss or gradient before training stops.
        use_chat_template: wrap prompts in the tokenizer's chat template (``None``: when it has one).
        system_prompt: system message used with the chat template.
        log_completions_every_n_steps: how often a table of sample completions is written (0: never).
        num_completions_to_log: rows of that table.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-arith",
        model_kwargs: dict[str, Any] | None = None,
        reward_funcs: list[RewardFn] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_reward: int = 0,
        sampler: Sampler = lazy_instance(GroupSampler),
        graph_builder: CausalGraphBuilder = lazy_instance(IndependentResponses),
        adjuster: RewardAdjuster = lazy_instance(GroupNormalizedAdvantage),
        kl: ProjectedKL = lazy_instance(ReferenceKL),
        num_generations: int = 8,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: LossType = "grpo",
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_grad_norm: float | None = 1.0,
        max_consecutive_skips: int = 10,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        log_completions_every_n_steps: int = 10,
        num_completions_to_log: int = 8,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_name_or_path = model_name_or_path
        self.model_kwargs = model_kwargs or {}
        self.reward_funcs = list(reward_funcs) if reward_funcs is not None else [arithmetic_accuracy]
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_funcs)
        self.accuracy_reward = accuracy_reward
        self.sampler, self.graph_builder, self.adjuster, self.kl = sampler, graph_builder, adjuster, kl
        self.num_generations = num_generations
        self.num_iterations = num_iterations
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.loss_type = loss_type
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.max_consecutive_skips = max_consecutive_skips
        self.use_chat_template, self.system_prompt = use_chat_template, system_prompt
        self.log_completions_every_n_steps = log_completions_every_n_steps
        self.num_completions_to_log = num_completions_to_log
        self.validate_settings()
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict and parameters()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.train_reward, self.train_accuracy = MeanMetric(), MeanMetric()
        self.val_reward, self.val_accuracy = MeanMetric(), MeanMetric()
        self.baseline_accuracy: float | None = None
        self.save_hyperparameters(ignore=["sampler", "graph_builder", "adjuster", "kl", "reward_funcs", "optimizer",
                                          "lr_scheduler"])

    # ----- checks done before anything expensive ---------------------------------------------------------------

    def validate_settings(self) -> None:
        """Raise a ``ValueError`` naming the bad setting; runs in ``__init__``, before any model is loaded."""
        errors = []
        if self.num_generations < 2:
            errors.append(f"num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.num_iterations < 1:
            errors.append(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.mini_batch_size is not None and (self.mini_batch_size < 1 or self.mini_batch_size % self.num_generations):
            errors.append(f"mini_batch_size ({self.mini_batch_size}) must be a positive multiple of num_generations "
                          f"({self.num_generations}) so that every optimiser step holds whole groups")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            errors.append(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not (0 < self.epsilon < 1) or self.epsilon_high <= 0:
            errors.append(f"epsilon must be in (0, 1) and epsilon_high > 0, got {self.epsilon}, {self.epsilon_high}")
        if self.loss_type not in LOSS_TYPES:
            errors.append(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.reward_funcs:
            errors.append("reward_funcs is empty")
        if len(self.reward_weights) != len(self.reward_funcs):
            errors.append(f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} functions")
        if not 0 <= self.accuracy_reward < max(len(self.reward_funcs), 1):
            errors.append(f"accuracy_reward={self.accuracy_reward} is not an index into reward_funcs")
        for fn in self.reward_funcs:
            if not callable(fn):
                errors.append(f"reward function {fn!r} is not callable")
        if errors:
            raise ValueError("GCPOModule: " + "; ".join(errors))

    def setup(self, stage: str) -> None:
        """Check the data against the settings once the data module is set up, before the model loads."""
        dm = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(dm, "batch_size", None)
        if stage == "fit" and batch_size is not None and self.mini_batch_size is not None:
            total = batch_size * self.num_generations
            if total % self.mini_batch_size:
                raise ValueError(f"GCPOModule: batch_size * num_generations = {batch_size} * {self.num_generations} "
                                 f"= {total} is not divisible by mini_batch_size={self.mini_batch_size}")
        rows = getattr(dm, "train_rows", None) or getattr(dm, "val_rows", None)
        if rows:
            self.dry_run_rewards(rows[0])

    def dry_run_rewards(self, row: dict[str, Any]) -> None:
        """Call every reward function on one real row with two placeholder completions.

        A function that needs a column the data lacks, raises, or returns the wrong number of values is
        reported (by name) before any model is loaded.
        """
        columns = {k: [v, v] for k, v in row.items() if k != "prompt"}
        compute_rewards(self.reward_funcs, self.reward_weights, [row["prompt"]] * 2, ["", " ?"], columns)

    # ----- models ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (and the frozen reference when the penalty needs one) once."""
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.model_name_or_path)
        self.policy = load_causal_lm(self.model_name_or_path, self.model_kwargs).train()
        if self.kl.needs_reference:
            reference = load_causal_lm(self.model_name_or_path, self.model_kwargs).eval().requires_grad_(False)
            self._reference = [reference]

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model, or ``None`` when the penalty does not need one."""
        return self._reference[0] if self._reference else None

    def models(self) -> PolicyModels:
        """The models bundle handed to components."""
        return PolicyModels(policy=self.policy, tokenizer=self.tokenizer, reference=self.reference,
                            temperature=self.sampler.temperature or 1.0, render=self.render)

    def render(self, text: str) -> str:
        """``text`` as fed to the model (chat template applied where used)."""
        return render_prompt(self.tokenizer, text, self.use_chat_template, self.system_prompt)

    def on_fit_start(self) -> None:
        """Move the reference next to the policy, and let the graph builder check lengths before training."""
        self.on_validation_start()
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "train_rows", None)
        check = getattr(self.graph_builder, "check_fits", None)  # optional: builders with long contexts have it
        if rows and check is not None:
            question = max((r.get("question", r["prompt"]) for r in rows[:1000]), key=len)
            check(self.models(), question, self.num_generations, self.sampler.max_completion_length)

    def on_validation_start(self) -> None:
        """Move the reference next to the policy (it is not a registered submodule)."""
        if self.reference is not None:
            self.reference.to(self.device)

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) built from the injected factories."""
        opt = self.optimizer_factory(self.policy.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ----- the training step -----------------------------------------------------------------------------------

    def prompts_for(self, rows: list[dict[str, Any]]) -> list[str]:
        """The rows' prompts as fed to the model (chat template applied where used)."""
        return [self.render(r["prompt"]) for r in rows]

    def score_rewards(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """``[N]`` total and ``[N, F]`` per-function rewards of the rollout's completions."""
        columns = {k: v for k, v in rollout.row_columns().items() if k != "prompt"}
        prompts = [r["prompt"] for r in rollout.rows for _ in range(rollout.group_size)]
        return compute_rewards(self.reward_funcs, self.reward_weights, prompts, rollout.completions, columns)

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Sample, reward, build the graph, compute advantages, prepare the penalty, update."""
        metrics: dict[str, float] = {}
        models = self.models()
        rollout = self.sampler.sample(models, self.prompts_for(batch), self.num_generations,
                                      score=self.needs_rollout_scores(len(batch)))
        rollout.rows = batch
        metrics.update(rollout.metrics)
        with timed(metrics, "rewards"):
            rewards, per_func = self.score_rewards(rollout)
        with timed(metrics, "graph"):
            graph = self.graph_builder.build(rollout, models, self.sampler)
        advantages = self.adjuster.adjust(rewards.to(self.device), rollout, graph)
        with timed(metrics, "reference"):
            prepared = self.kl.prepare(rollout, graph, models)
        with timed(metrics, "update"):
            metrics.update(self.update(rollout, advantages, prepared, models))
        metrics.update(graph.metrics, **advantages.metrics)
        self.log_step(rollout, rewards, per_func, metrics)

    def needs_rollout_scores(self, num_prompts: int) -> bool:
        """Whether the rollout must be re-scored before the update (old log-probs, hidden states).

        Not when the update is one on-policy step over the whole rollout (then ``pi_old`` is the current policy and
        its log-probs come from the update's own pass, as in TRL) and no component reads representations.
        Components declare ``needs_representations = False`` to allow this; unknown components are assumed to
        need them.
        """
        one_step = self.num_iterations == 1 and (self.mini_batch_size or 0) in (0, num_prompts * self.num_generations)
        reads = any(getattr(c, "needs_representations", True) for c in (self.graph_builder, self.adjuster, self.kl))
        return not one_step or reads

    def mini_batches(self, n: int) -> list[Tensor]:
        """Completion indices of each optimiser step of one pass: whole groups, in a random group order."""
        size = self.mini_batch_size or n
        groups = torch.randperm(n // self.num_generations) if size < n else torch.arange(n // self.num_generations)
        order = (groups.unsqueeze(1) * self.num_generations + torch.arange(self.num_generations)).view(-1)  # [N]
        return list(order.to(self.device).split(size))

    def update(self, rollout: Rollout, advantages: Advantages, prepared: dict[str, Any], models: PolicyModels) -> dict:
        """``num_iterations`` passes of clipped-surrogate steps against the rollout's old log-probs."""
        stats: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for index in self.mini_batches(len(rollout.completions)):
                step = self.optimisation_step(rollout.select(index), advantages.values[index],
                                              {k: v[index] for k, v in prepared.items()}, models)
                for k, v in step.items():
                    stats.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def optimisation_step(self, mb: Rollout, adv: Tensor, prepared: dict[str, Any], models: PolicyModels) -> dict:
        """One optimiser step on a mini-batch, accumulated over micro-batches; non-finite steps are skipped."""
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        stats: dict[str, float] = {}
        for index, weight in self.micro_batches(mb):
            micro = mb.select(index)
            loss, ratio, scores, penalty = self.compute_loss(micro, adv[index], {k: v[index] for k, v in prepared.items()},
                                                             models)
            if not torch.isfinite(loss):
                return self.skip_step(opt, "loss")
            self.manual_backward(loss * weight)
            mask = micro.completion_mask.float()
            clips = clip_fractions(ratio.detach(), adv[index], mask, self.epsilon, self.epsilon_high)
            micro_stats = {"loss": loss.item(), "entropy": masked_mean(scores.entropy, mask), **penalty.metrics}
            micro_stats.update({f"clip_ratio/{k}_mean": v.item() for k, v in clips.items()})
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0.0) + weight * v
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):
            return self.skip_step(opt, "gradient")
        opt.step()
        self.consecutive_skips = 0
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return {**stats, "grad_norm": grad_norm.item()}

    def micro_batches(self, mb: Rollout) -> list[tuple[Tensor, float]]:
        """Chunks of ``micro_batch_size`` completions and the weight that makes their summed losses the full loss.

        The weight is the chunk's share of completions (``grpo``, ``dr_grpo``) or of completion tokens (``dapo``).
        """
        n = mb.completion_ids.shape[0]
        chunks = list(torch.arange(n, device=mb.completion_ids.device).split(self.micro_batch_size or n))
        if self.loss_type == "dapo":
            tokens = mb.completion_mask.sum(1).float()  # [n]
            return [(c, (tokens[c].sum() / tokens.sum().clamp(min=1)).item()) for c in chunks]
        return [(c, len(c) / n) for c in chunks]

    def compute_loss(
        self, mb: Rollout, adv: Tensor, prepared: dict[str, Any], models: PolicyModels
    ) -> tuple[Tensor, Tensor, Scores, Penalty]:
        """``-J`` on a mini-batch under the current policy (paper Eq. 10, 12), with what the metrics need."""
        scores = score_completions(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                   temperature=models.temperature)
        penalty = self.kl.penalty(scores, mb, prepared, models)
        old_logps = scores.logps.detach() if mb.old_logps is None else mb.old_logps  # on-policy: pi_old = pi_theta
        loss, ratio = policy_loss(scores.logps, old_logps, adv, mb.completion_mask.float(), penalty.per_token,
                                  self.epsilon, self.epsilon_high, self.loss_type, self.sampler.max_completion_length)
        return loss, ratio, scores, penalty

    def skip_step(self, opt: Any, what: str) -> dict:
        """Count a skipped step: gradients are dropped, the optimiser step is a no-op on the weights.

        The step still counts towards ``max_steps`` (so a run of bad steps cannot loop forever), and
        ``max_consecutive_skips`` in a row stop training with an error.
        """
        opt.zero_grad(set_to_none=True)
        opt.step()  # no parameter has a gradient, so nothing changes; Lightning's step counter advances
        self.skipped_steps += 1
        self.consecutive_skips += 1
        rank_zero_info(f"GCPOModule: non-finite {what} at global step {self.global_step}; step skipped "
                       f"({self.skipped_steps} skipped so far)")
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(f"GCPOModule: {self.consecutive_skips} consecutive steps had a non-finite "
                                     f"{what}; stopping (raise max_consecutive_skips to tolerate more)")
        return {}

    # ----- logging ---------------------------------------------------------------------------------------------

    def log_step(self, rollout: Rollout, rewards: Tensor, per_func: Tensor, metrics: dict[str, float]) -> None:
        """Log the step's metrics; reward and accuracy go to the progress bar."""
        lengths = rollout.completion_mask.sum(1).float()  # [N]
        acc = per_func[:, self.accuracy_reward]  # [N]
        self.train_reward(rewards)
        self.train_accuracy(acc)
        self.log("reward", self.train_reward, prog_bar=True, on_step=True, on_epoch=False)
        self.log("accuracy", self.train_accuracy, prog_bar=True, on_step=True, on_epoch=False)
        metrics.update({
            "reward_std": rewards.std().item(),
            "frac_reward_zero_std": frac_zero_std(rewards, rollout.group_size),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": rollout.truncated.float().mean().item() if rollout.truncated is not None else 0.0,
            "skipped_steps": float(self.skipped_steps),
        })
        for k, name in enumerate(unique_names([reward_name(fn) for fn in self.reward_funcs])):
            metrics[f"rewards/{name}/mean"] = per_func[:, k].mean().item()
            metrics[f"rewards/{name}/std"] = per_func[:, k].std().item()
        self.log_dict(metrics, on_step=True, on_epoch=False)
        every = self.log_completions_every_n_steps
        if every and self.global_step % every == 0:
            self.log_completions(rollout, rewards)

    def log_completions(self, rollout: Rollout, rewards: Tensor) -> None:
        """Write a table of sample completions (``completions.jsonl`` in the log folder, and to the logger)."""
        if self.trainer.is_global_zero:
            table = completions_table(rollout, rewards, self.global_step, self.num_completions_to_log)
            write_completions(table, self.trainer.log_dir, self.logger, self.global_step)

    # ----- held-out evaluation ---------------------------------------------------------------------------------

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Greedy completion of each held-out prompt; reward and accuracy are accumulated."""
        rollout = self.sampler.sample(self.models(), self.prompts_for(batch), 1, greedy=True, score=False)
        rollout.rows = batch
        rewards, per_func = self.score_rewards(rollout)
        self.val_reward.update(rewards)
        self.val_accuracy.update(per_func[:, self.accuracy_reward])

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        """Log held-out accuracy; the sanity check before training is logged as the step-0 baseline."""
        accuracy, reward = self.val_accuracy.compute().item(), self.val_reward.compute().item()
        self.val_accuracy.reset()
        self.val_reward.reset()
        if self.trainer.sanity_checking:
            self.baseline_accuracy = accuracy
            rank_zero_info(f"held-out accuracy before training: {accuracy:.3f}")
            if self.logger is not None:
                self.logger.log_metrics({"val/accuracy": accuracy, "val/reward": reward}, step=0)
            return
        prefix = "test" if self.trainer.testing else "val"
        self.log(f"{prefix}/accuracy", accuracy, prog_bar=True)
        self.log(f"{prefix}/reward", reward)
        rank_zero_info(f"held-out accuracy ({prefix}) at step {self.global_step}: {accuracy:.3f}"
                       + (f" (before training: {self.baseline_accuracy:.3f})" if self.baseline_accuracy is not None else ""))

    on_test_epoch_end = on_validation_epoch_end
