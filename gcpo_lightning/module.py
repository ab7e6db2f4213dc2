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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.utils import clip_grad_norm_
from torchmetrics import MeanMetric

from gcpo_lightning.components.adjusters.group_normalized import GroupNormalizedAdvantage
from gcpo_lightning.components.graphs.independent import IndependentResponses
from gcpo_lightning.components.penalties.reference_kl import ReferenceKL
from gcpo_lightning.components.sampling.group_sampler import GroupSampler
from gcpo_lightning.components.scoring.logprobs import score_completions
from gcpo_lightning.evaluation.metric import SampledEvaluation
from gcpo_lightning.evaluation.records import answer_keys, problem_records, results_path, write_problem_results
from gcpo_lightning.functional.losses import clip_fractions, masked_mean, policy_loss
from gcpo_lightning.interfaces.containers import Advantages, Penalty, PolicyModels, Rollout, Scores
from gcpo_lightning.interfaces.protocols import CausalGraphBuilder, ProjectedKL, RewardAdjuster, RewardFn, Sampler
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer, render_prompt
from gcpo_lightning.policy.lora import DisabledAdapterReference, LoRAConfig, apply_lora
from gcpo_lightning.policy.quantization import QuantizationConfig, load_quantized
from gcpo_lightning.policy.sharding import full_parameters, full_tensor, shard_policy
from gcpo_lightning.rewards.arithmetic import arithmetic_accuracy
from gcpo_lightning.rewards.base import compute_rewards, reward_name
from gcpo_lightning.training.batching import micro_batches, mini_batches
from gcpo_lightning.training.checks import check_data, settings_errors
from gcpo_lightning.training.completions import completions_table, write_completions
from gcpo_lightning.training.distributed import check_strategy, gather_across_ranks, rank_share
from gcpo_lightning.training.metrics import reward_fn_metrics, rollout_metrics
from gcpo_lightning.training.rng import all_rng_states, restore_rank_rng

LossType = Literal["grpo", "dapo", "dr_grpo"]

# Lightning warns that with manual optimisation a step-interval checkpoint holds the weights *after* the step:
# that is what we want (weights, optimiser state and step counter agree; exact resume is tested).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with the paper's weight decay (0.01) and a learning rate suited to the embedded tiny model."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


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
        gradient_checkpointing: recompute each decoder layer's activations in backward (less memory, ~30% slower).
        logits_chunk_size: compute log-probs from the final hidden states this many completions at a time (in the
            update each chunk's logits are recomputed in backward), so no ``[N, T, V]`` logits tensor is ever
            alive, in any scoring pass; ``None``: the model's own logits for each scoring batch.
        eval_num_samples: completions per held-out problem in validate/test (and validation during fit): 1 is
            greedy decoding; more are sampled with the sampler's settings and give pass@k, mean@k, majority@k.
        eval_pass_at: the ``k`` values reported as ``pass@k`` (unbiased estimator); default ``(1, eval_num_samples)``.
        eval_results_path: write one JSON line per held-out problem here (``{stage}`` and ``{step}`` are filled
            in, e.g. ``runs/eval/{stage}_{step}.jsonl``); ``None``: no file.
        fsdp_param_dtype: under ``ModelParallelStrategy`` (FSDP2), the dtype parameters are all-gathered in for
            forward/backward (``bfloat16`` for mixed precision; ``None`` keeps the stored dtype). Gradients are
            reduced in ``float32``.
        lora: train LoRA adapters (PEFT) instead of the full policy; the reference is then the same model with
            its adapters disabled (no second copy in memory).
        quantization: load the policy's base in 4-bit (QLoRA; requires ``lora``).
        reference_quantization: load the frozen reference in 4-bit NF4 (bitsandbytes), ~4x less memory than
            bf16; ignored with ``lora`` (whose reference is the policy's own base).
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
        eval_num_samples: int = 1,
        eval_pass_at: list[int] | None = None,
        eval_results_path: str | None = None,
        gradient_checkpointing: bool = False,
        logits_chunk_size: int | None = None,
        fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = None,
        lora: LoRAConfig | None = None,
        quantization: QuantizationConfig | None = None,
        reference_quantization: QuantizationConfig | None = None,
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
        self.eval_num_samples, self.eval_pass_at = eval_num_samples, eval_pass_at
        self.eval_results_path = eval_results_path
        self.gradient_checkpointing = gradient_checkpointing
        self.logits_chunk_size = logits_chunk_size
        self.fsdp_param_dtype = fsdp_param_dtype
        self.lora, self.quantization, self.reference_quantization = lora, quantization, reference_quantization
        self.validate_settings()
        self.policy: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict and parameters()
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.train_reward, self.train_accuracy = MeanMetric(), MeanMetric()
        self.val_reward = MeanMetric()
        self.eval_metric = SampledEvaluation(k=eval_num_samples, ks=eval_pass_at)
        self.baseline_accuracy: float | None = None
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._problems_written = 0  # index of the next per-problem evaluation record
        self.strict_loading = quantization is None  # QLoRA checkpoints hold the adapters only (on_save_checkpoint)
        self.save_hyperparameters(ignore=["sampler", "graph_builder", "adjuster", "kl", "reward_funcs", "optimizer",
                                          "lr_scheduler"])

    # ----- checks done before anything expensive ---------------------------------------------------------------

    def validate_settings(self) -> None:
        """Raise a ``ValueError`` naming every bad setting; runs in ``__init__``, before any model is loaded."""
        errors = settings_errors(self)
        if errors:
            raise ValueError("GCPOModule: " + "; ".join(errors))

    def setup(self, stage: str) -> None:
        """Check the strategy, and the data against the settings, once they are set up and before the model loads."""
        check_strategy(self.trainer.strategy)
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None:
            check_data(self, dm, stage)

    # ----- models ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (and the frozen reference when the penalty needs one) once."""
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.model_name_or_path)
        policy = self.load_model(self.quantization)
        if self.gradient_checkpointing:
            policy.activation_checkpointing_enable({"use_reentrant": False})  # transformers' gradient checkpointing
        if self.lora is not None:
            policy = apply_lora(policy, self.lora)
        mesh = self.device_mesh  # set by ModelParallelStrategy (FSDP2)
        if mesh is not None:
            dtype = getattr(torch, self.fsdp_param_dtype) if self.fsdp_param_dtype else None
            shard_policy(policy.to(self.device), mesh, param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        self.policy = policy.train()
        if self.kl.needs_reference and self.lora is not None:
            self._reference = [DisabledAdapterReference(self.policy)]
        elif self.kl.needs_reference:
            self._reference = [self.load_model(self.reference_quantization).eval().requires_grad_(False)]

    def load_model(self, quantization: QuantizationConfig | None) -> torch.nn.Module:
        """The model from ``model_name_or_path``, in 4-bit when ``quantization`` is given."""
        if quantization is None:
            return load_causal_lm(self.model_name_or_path, self.model_kwargs)
        return load_quantized(self.model_name_or_path, self.model_kwargs, quantization)

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model, or ``None`` when the penalty does not need one."""
        return self._reference[0] if self._reference else None

    def models(self) -> PolicyModels:
        """The models bundle handed to components."""
        return PolicyModels(policy=self.policy, tokenizer=self.tokenizer, reference=self.reference,
                            temperature=self.sampler.temperature or 1.0, render=self.render,
                            logits_chunk_size=self.logits_chunk_size)

    def render(self, text: str) -> str:
        """``text`` as fed to the model (chat template applied where used)."""
        return render_prompt(self.tokenizer, text, self.use_chat_template, self.system_prompt)

    def on_fit_start(self) -> None:
        """Move the reference next to the policy, and let the graph builder check lengths before training.

        With several ranks each rank's global generator is re-seeded with ``seed + rank``, so ranks draw
        independent sampling noise (a resumed run then restores every rank's own state in ``on_train_start``).
        """
        self.on_validation_start()
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)
        dm = getattr(self.trainer, "datamodule", None)
        rows = getattr(dm, "train_rows", None)
        check = getattr(self.graph_builder, "check_fits", None)  # optional: builders with long contexts have it
        if rows and check is not None:
            question = max((r.get("question", r["prompt"]) for r in rows[:1000]), key=len)
            check(self.models(), question, self.num_generations, self.sampler.max_completion_length)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add every rank's random states and the skip counters (the frozen reference is never saved).

        With a 4-bit base (QLoRA) only the trainable adapters are saved: the frozen base is rebuilt from
        ``model_name_or_path`` on load, like the reference (bitsandbytes' packed weights cannot be loaded back into
        an already quantized model).
        """
        if self.quantization is not None:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if not k.startswith("policy.") or k in self.trainable_keys()}
        checkpoint["gcpo_rng_states"] = all_rng_states()
        checkpoint["gcpo_counters"] = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the policy's trainable parameters."""
        return {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random states for ``on_train_start`` (restoring earlier would be consumed by set-up)."""
        if self.quantization is not None and self.policy is not None:
            missing = sorted(self.trainable_keys() - checkpoint["state_dict"].keys())
            if missing:
                raise KeyError(f"GCPOModule: the checkpoint lacks {len(missing)} adapter weights, e.g. {missing[:3]}")
        self._rng_to_restore = checkpoint.get("gcpo_rng_states")
        counters = checkpoint.get("gcpo_counters", {})
        self.skipped_steps = counters.get("skipped_steps", 0)
        self.consecutive_skips = counters.get("consecutive_skips", 0)

    def on_train_start(self) -> None:
        """On resume, continue the random streams exactly where the checkpoint left them."""
        if self._rng_to_restore is not None:
            restore_rank_rng(self._rng_to_restore)
            self._rng_to_restore = None

    def on_validation_start(self) -> None:
        """Move the reference next to the policy (it is not a registered submodule)."""
        if self.reference is not None:
            self.reference.to(self.device)

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) built from the injected factories."""
        opt = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])  # LoRA: adapters
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
        with full_parameters(self.policy):  # FSDP: gather once for the whole no-grad rollout phase
            rollout = self.sampler.sample(models, self.prompts_for(batch), self.num_generations,
                                          score=self.needs_rollout_scores(len(batch)))
            rollout.rows = batch
            metrics.update(rollout.metrics)
            with timed(metrics, "rewards"):
                rewards, per_func = self.score_rewards(rollout)
                rewards, per_func = rewards.to(self.device), per_func.to(self.device)
            with timed(metrics, "graph"):
                graph = self.graph_builder.build(rollout, models, self.sampler)
            batch_rewards = gather_across_ranks(rewards)  # [W*N]: every rank's rewards
            advantages = self.adjuster.adjust(rewards, rollout, graph, batch_rewards=batch_rewards)
            with timed(metrics, "reference"):
                prepared = self.kl.prepare(rollout, graph, models)
        with timed(metrics, "update"):
            metrics.update(self.update(rollout, advantages, prepared, models))
        metrics.update(graph.metrics, **advantages.metrics)
        self.log_step(rollout, batch_rewards, gather_across_ranks(per_func), metrics)

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

    def update(self, rollout: Rollout, advantages: Advantages, prepared: dict[str, Any], models: PolicyModels) -> dict:
        """``num_iterations`` passes of clipped-surrogate steps against the rollout's old log-probs."""
        stats: dict[str, list[float]] = {}
        for _ in range(self.num_iterations):
            for index in mini_batches(len(rollout.completions), self.num_generations, self.mini_batch_size,
                                      self.device):
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
        # dapo's token mean across ranks: weigh this rank by its share of the step's tokens
        share = rank_share(mb.completion_mask.sum()) if self.loss_type == "dapo" else 1.0
        for index, weight in micro_batches(mb.completion_mask, self.micro_batch_size, self.loss_type == "dapo"):
            micro = mb.select(index)
            micro_prepared = {k: v[index] for k, v in prepared.items()}
            loss, ratio, scores, penalty = self.compute_loss(micro, adv[index], micro_prepared, models)
            if not torch.isfinite(loss):
                return self.skip_step(opt, "loss")
            self.manual_backward(loss * weight * share)
            mask = micro.completion_mask.float()
            clips = clip_fractions(ratio.detach(), adv[index], mask, self.epsilon, self.epsilon_high)
            micro_stats = {"loss": loss.item(), "entropy": masked_mean(scores.entropy, mask), **penalty.metrics}
            micro_stats.update({f"clip_ratio/{k}_mean": v.item() for k, v in clips.items()})
            for k, v in micro_stats.items():
                stats[k] = stats.get(k, 0.0) + weight * v
        grad_norm = full_tensor(clip_grad_norm_(self.policy.parameters(), self.max_grad_norm or float("inf")))
        if not torch.isfinite(grad_norm):
            return self.skip_step(opt, "gradient")
        opt.step()
        self.consecutive_skips = 0
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return {**stats, "grad_norm": grad_norm.item()}

    def compute_loss(
        self, mb: Rollout, adv: Tensor, prepared: dict[str, Any], models: PolicyModels
    ) -> tuple[Tensor, Tensor, Scores, Penalty]:
        """``-J`` on a mini-batch under the current policy (paper Eq. 10, 12), with what the metrics need."""
        scores = score_completions(self.policy, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                   temperature=models.temperature, logits_chunk_size=models.logits_chunk_size)
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
        """Log the step's metrics (rewards of all ranks, ``[W*N]`` and ``[W*N, F]``); reward and accuracy go to the
        progress bar."""
        self.train_reward(rewards)
        self.train_accuracy(per_func[:, self.accuracy_reward])
        self.log("reward", self.train_reward, prog_bar=True, on_step=True, on_epoch=False)
        self.log("accuracy", self.train_accuracy, prog_bar=True, on_step=True, on_epoch=False)
        names = [reward_name(fn) for fn in self.reward_funcs]
        metrics.update(rollout_metrics(rollout, rewards, per_func, names))
        metrics.update(reward_fn_metrics(self.reward_funcs, names))
        metrics["skipped_steps"] = float(self.skipped_steps)
        self.log_dict(metrics, on_step=True, on_epoch=False)
        every = self.log_completions_every_n_steps
        if every and self.global_step % every == 0:
            self.log_completions(rollout, rewards[: len(rollout.completions)])  # rank 0's rows come first

    def log_completions(self, rollout: Rollout, rewards: Tensor) -> None:
        """Write a table of sample completions (``completions.jsonl`` in the log folder, and to the logger)."""
        if self.trainer.is_global_zero:
            table = completions_table(rollout, rewards, self.global_step, self.num_completions_to_log)
            write_completions(table, self.trainer.log_dir, self.logger, self.global_step)

    # ----- held-out evaluation ---------------------------------------------------------------------------------

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        """``eval_num_samples`` completions per held-out problem (greedy when 1), scored by the reward functions."""
        k = self.eval_num_samples
        with full_parameters(self.policy):
            rollout = self.sampler.sample(self.models(), self.prompts_for(batch), k, greedy=k == 1, score=False)
        rollout.rows = batch
        rewards, per_func = self.score_rewards(rollout)
        correct = (per_func[:, self.accuracy_reward] > 0.5).view(len(batch), k)  # [P, k]
        keys = answer_keys(self.reward_funcs[self.accuracy_reward], rollout.completions, k)
        self.eval_metric.update(correct, keys)
        self.val_reward.update(rewards)
        if self.eval_results_path:
            self.write_problem_results(batch, rollout.completions, rewards, correct, keys, batch_idx)

    test_step = validation_step

    def write_problem_results(self, batch: list, completions: list[str], rewards: Tensor, correct: Tensor,
                              keys: list | None, batch_idx: int) -> None:
        """Append this batch's per-problem records to the results JSONL (a new file at each evaluation)."""
        stage = "test" if self.trainer.testing else "val"
        path = results_path(self.eval_results_path, stage, self.global_step, self.global_rank, self.trainer.world_size)
        if batch_idx == 0:  # a new evaluation: a new file, indices from 0
            self._problems_written = 0
        records = problem_records(batch, completions, rewards, correct, keys, ks=self.eval_metric.ks,
                                  majority_k=self.eval_num_samples, start_index=self._problems_written)
        self._problems_written += len(batch)
        write_problem_results(path, records, append=batch_idx > 0)

    def on_validation_epoch_end(self) -> None:
        """Log pass@1 (as ``accuracy``), pass@k, mean@k and majority@k; the sanity check is the step-0 baseline."""
        values = {k: v.item() for k, v in self.eval_metric.compute().items()}
        values["accuracy"], values["reward"] = values["pass@1"], self.val_reward.compute().item()
        self.eval_metric.reset()
        self.val_reward.reset()
        if self.trainer.sanity_checking:
            self.baseline_accuracy = values["accuracy"]
            rank_zero_info(f"held-out accuracy before training: {values['accuracy']:.3f}")
            if self.logger is not None:
                self.logger.log_metrics({f"val/{k}": v for k, v in values.items()}, step=0)
            return
        prefix = "test" if self.trainer.testing else "val"
        accuracy = values.pop("accuracy")
        self.log(f"{prefix}/accuracy", accuracy, prog_bar=True)
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        before = f" (before training: {self.baseline_accuracy:.3f})" if self.baseline_accuracy is not None else ""
        rank_zero_info(f"held-out accuracy ({prefix}) at step {self.global_step}: {accuracy:.3f}{before}")

    on_test_epoch_end = on_validation_epoch_end
