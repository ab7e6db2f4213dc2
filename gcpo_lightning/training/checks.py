"""Checks of a module's settings and of the data against them, run before any model is loaded.

Each problem is reported naming the setting, the reward function or the row, so that a bad config or data set
fails in seconds instead of after the model has loaded.
"""

from __future__ import annotations

from typing import Any

from gcpo_lightning.rewards.base import compute_rewards

GOLD_CHECK_ROWS = 2000
"""Training rows whose reference answers are checked up front (every validation row is)."""


def settings_errors(m: Any) -> list[str]:
    """Every problem with a :class:`~gcpo_lightning.module.GCPOModule`'s settings, each naming the setting."""
    errors = []
    if m.num_generations < 2:
        errors.append(f"num_generations must be >= 2 (a group needs a baseline), got {m.num_generations}")
    if m.num_iterations < 1:
        errors.append(f"num_iterations must be >= 1, got {m.num_iterations}")
    if m.mini_batch_size is not None and (m.mini_batch_size < 1 or m.mini_batch_size % m.num_generations):
        errors.append(
            f"mini_batch_size ({m.mini_batch_size}) must be a positive multiple of num_generations "
            f"({m.num_generations}) so that every optimiser step holds whole groups"
        )
    if m.eval_num_samples < 1 or any(not 1 <= k <= m.eval_num_samples for k in m.eval_pass_at or []):
        errors.append(
            f"eval_num_samples must be >= 1 and every eval_pass_at k in [1, eval_num_samples], got "
            f"eval_num_samples={m.eval_num_samples}, eval_pass_at={m.eval_pass_at}"
        )
    if m.micro_batch_size is not None and m.micro_batch_size < 1:
        errors.append(f"micro_batch_size must be >= 1, got {m.micro_batch_size}")
    if m.micro_batch_tokens is not None and m.micro_batch_tokens < 1:
        errors.append(f"micro_batch_tokens must be >= 1 or null, got {m.micro_batch_tokens}")
    if not (0 < m.epsilon < 1) or m.epsilon_high <= 0:
        errors.append(f"epsilon must be in (0, 1) and epsilon_high > 0, got {m.epsilon}, {m.epsilon_high}")
    if not callable(m.loss) or not hasattr(m.loss, "micro_batches"):
        errors.append(f"loss must be a LossAggregation (SequenceMean, TokenMean, ConstantNormalizer), got {m.loss!r}")
    if not m.reward_funcs:
        errors.append("reward_funcs is empty")
    if len(m.reward_weights) != len(m.reward_funcs):
        errors.append(f"reward_weights has {len(m.reward_weights)} entries for {len(m.reward_funcs)} functions")
    if not 0 <= m.accuracy_reward < max(len(m.reward_funcs), 1):
        errors.append(f"accuracy_reward={m.accuracy_reward} is not an index into reward_funcs")
    for fn in m.reward_funcs:
        if not callable(fn):
            errors.append(f"reward function {fn!r} is not callable")
    if getattr(m.graph_builder, "num_context_samples", None) == 0 and getattr(
        m.adjuster, "needs_context_samples", False
    ):
        errors.append(
            f"graph_builder num_context_samples: 0 leaves no context samples, but the adjuster "
            f"{type(m.adjuster).__name__} reads their mean representation Zbar (use K >= 1, or an adjuster that "
            "reads none, such as GroupNormalizedAdvantage)"
        )
    return errors + set_layout_errors(m)


def set_layout_errors(m: Any) -> list[str]:
    """What ``graph_builder.init_args.context_layout: set`` cannot be combined with (the sampler's backend, the
    causal KL's ``policy_context: context_frozen``)."""
    if getattr(m.graph_builder, "context_layout", "text") != "set":
        return []
    errors = []
    if not hasattr(m.sampler, "sample_set") or not hasattr(getattr(m.sampler, "backend", None), "generate_set"):
        errors.append(
            "graph_builder context_layout: set needs a GroupSampler with the KVCacheLoop backend, got "
            f"{type(m.sampler).__name__} with {getattr(m.sampler, 'backend', None)!r}"
        )
    if getattr(m.kl, "policy_context", None) == "context_frozen":
        errors.append(
            "graph_builder context_layout: set works with kl policy_context: context or query, not context_frozen"
        )
    return errors


def check_data(m: Any, dm: Any, stage: str) -> None:
    """Check the set-up data module against the module ``m``: batch divisibility, the reward functions on a real
    row, and every reference answer a reward function can check (``check_gold``, e.g. ``MathAccuracy``)."""
    batch_size = getattr(dm, "batch_size", None)
    if stage == "fit" and batch_size is not None and m.mini_batch_size is not None:
        total = batch_size * m.num_generations
        if total % m.mini_batch_size:
            raise ValueError(
                f"GCPOModule: batch_size * num_generations = {batch_size} * {m.num_generations} "
                f"= {total} is not divisible by mini_batch_size={m.mini_batch_size}"
            )
    rows = getattr(dm, "train_rows", None) or getattr(dm, "val_rows", None)
    if rows:
        dry_run_rewards(m.reward_funcs, m.reward_weights, rows[0])
    for fn in m.reward_funcs:
        check = getattr(fn, "check_gold", None)
        if check is not None:
            check([*getattr(dm, "val_rows", []), *getattr(dm, "train_rows", [])[:GOLD_CHECK_ROWS]])


def dry_run_rewards(funcs: list[Any], weights: list[float], row: dict[str, Any]) -> None:
    """Call every reward function on one real row with two placeholder completions.

    A function that needs a column the data lacks, raises, or returns the wrong number of values is reported (by
    name) before any model is loaded.
    """
    columns = {k: [v, v] for k, v in row.items() if k != "prompt"}
    compute_rewards(funcs, weights, [row["prompt"]] * 2, ["", " ?"], columns)


def check_fits(m: Any, dm: Any) -> None:
    """Let a graph builder with long contexts check (``check_fits``) that the longest question fits the model."""
    rows = getattr(dm, "train_rows", None)
    check = getattr(m.graph_builder, "check_fits", None)  # optional: builders with long contexts have it
    if rows and check is not None:
        question = max((r.get("question", r["prompt"]) for r in rows[:1000]), key=len)
        check(m.models(), question, m.num_generations, m.sampler.max_completion_length)


def needs_rollout_scores(m: Any, num_prompts: int) -> bool:
    """Whether the rollout must be re-scored before the update (old log-probs, hidden states).

    Not when the update is one on-policy step over the whole rollout (then ``pi_old`` is the current policy and
    its log-probs come from the update's own pass, as in TRL) and no component reads representations.
    Components declare ``needs_representations = False`` to allow this; unknown components are assumed to
    need them.
    """
    one_step = m.num_iterations == 1 and (m.mini_batch_size or 0) in (0, num_prompts * m.num_generations)
    reads = any(getattr(c, "needs_representations", True) for c in (m.graph_builder, m.adjuster, m.kl))
    return not one_step or reads
