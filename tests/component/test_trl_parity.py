"""Parity of our GRPO maths with TRL 1.16's ``GRPOTrainer`` on the same inputs and the same model.

What is compared:

* the loss and the gradient of every model parameter: TRL's ``GRPOTrainer._compute_loss(model, inputs)`` on a
  hand-made batch against :func:`gcpo_lightning.functional.losses.policy_loss` fed with log-probs from
  :func:`gcpo_lightning.components.scoring.logprobs.score_completions` and the penalty of
  :class:`gcpo_lightning.components.penalties.reference_kl.ReferenceKL`, for ``loss_type`` in grpo / dapo / dr_grpo,
  ``beta`` in 0 / 0.04, with ``epsilon_high != epsilon`` in two of
  the three loss types and old log-probs far enough from the current ones that both clip sides are active;
* the advantages: TRL computes them inline in ``_generate_and_score_completions`` (there is no function to call
  in isolation), so that whole method is run on the tiny model with a reward function returning fixed values,
  and its ``advantages`` are compared with :func:`gcpo_lightning.functional.advantages.group_normalize` for every
  ``scale_rewards``;
* log-probs against ``generate``: our scoring reproduces the (temperature-scaled) log-softmax of the logits that
  ``generate`` itself sampled from, on left-padded prompts.

Two TRL 1.16 defaults change the numbers and are switched off here to compare like with like:

* ``GRPOConfig.use_bias_correction_kl`` defaults to ``True``: TRL multiplies the per-token k3 KL by the
  (differentiable) importance ratio ``pi_theta / pi_old`` (DeepSeek-V3.2), which changes the KL gradient even
  on-policy (``grad(R * k3) = grad(k3) + k3 * grad(log pi)`` at ``R = 1``). Our :class:`ReferenceKL` is the
  paper's / original GRPO's ``beta * k3`` (Eq. 7), so the parity tests set it to ``False``;
  ``test_trl_default_bias_corrected_kl_is_ratio_times_ours`` pins down the default's exact relation to ours.
* ``GRPOConfig.bf16`` defaults to ``True``, even on CPU, so TRL's forward passes run under bf16 autocast
  (log-probs differ from fp32 by ~1e-3). The trainers here set ``bf16=False``; our module runs in the model's
  dtype (fp32 here).

(``gradient_checkpointing`` also defaults to ``True`` in TRL; it does not change the values, only the time, and
is switched off to keep the tests quick.) One difference turns out not to matter:

* Position ids. TRL 1.16 scores ``[prompt | completion]`` with its fused LM head and passes no ``position_ids``,
  so the model uses ``arange(L)`` whatever the left padding; we pass ``cumsum(mask) - 1`` as ``generate`` does.
  For RoPE models (Llama, Qwen, SmolLM2, ...) attention depends only on position *differences*, and a row's
  left padding shifts all its positions by the same amount, so both give the same log-probs (measured: ~5e-7
  in fp32, rounding of the rotation angles). The comparison therefore uses left-padded prompts on purpose;
  ``test_left_padded_positions_do_not_matter_for_rope`` checks that shift invariance directly and
  ``test_scores_match_generate`` checks that ours are the probabilities ``generate`` sampled from. For a model
  with absolute position embeddings TRL's scores of left-padded rows would not match ``generate``; ours would.

Cost: importing ``trl`` takes ~10 s on a loaded 2-core CPU; the tests themselves take a few seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from gcpo_lightning.components.penalties.reference_kl import ReferenceKL  # noqa: E402
from gcpo_lightning.components.sampling.group_sampler import completion_mask_from_eos, eos_ids  # noqa: E402
from gcpo_lightning.components.scoring.logprobs import score_completions  # noqa: E402
from gcpo_lightning.functional.advantages import group_normalize  # noqa: E402
from gcpo_lightning.functional.losses import (  # noqa: E402
    IS_MODES,
    LOSS_TYPES,
    clip_fractions,
    importance_weights,
    policy_loss,
)
from gcpo_lightning.interfaces.containers import (  # noqa: E402
    ImportanceCorrection,
    PenaltyInputs,
    PolicyModels,
    Rollout,
    Scores,
)
from gcpo_lightning.policy.loading import load_causal_lm, load_tokenizer  # noqa: E402

G = 4  # num_generations
N = 8  # completions in the hand-made batch (two groups)
P, T = 7, 9  # prompt and completion widths (T is also max_completion_length)
TEMPERATURE = 0.7
EPSILON = 0.2
EPSILON_HIGH = {"grpo": 0.2, "dapo": 0.28, "dr_grpo": 0.25}  # equal to epsilon for grpo, clip-higher otherwise
# Measured on CPU/fp32: |loss diff| <= 2.3e-8, per-tensor max |grad diff| / max |grad| <= 6.2e-7.
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-5  # per parameter tensor: max |g_ours - g_trl| <= GRAD_RTOL * max |g_trl| + 1e-7


def make_trainer(model_dir: Path, out: Path, **config):
    """A real ``GRPOTrainer`` on the tiny local model (fp32, CPU, no reporting, no saving)."""
    reward = config.pop("_reward", None) or (lambda completions, **kw: [0.0] * len(completions))
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    settings = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        num_generations=G,
        per_device_train_batch_size=N,
        gradient_accumulation_steps=1,
        max_completion_length=T,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        num_iterations=1,
        seed=0,
        use_bias_correction_kl=False,
        gradient_checkpointing=False,
    )
    settings.update(config)
    args = trl.GRPOConfig(**settings)
    rows = [{"prompt": f"Problem: {i}+{i + 1}\nSolution:"} for i in range(N)]
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; _compute_loss divides by it
    trainer.model.train()
    return trainer


def hand_made_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded completions of different lengths, fixed random tokens."""
    g = torch.Generator().manual_seed(0)
    prompt_len = torch.tensor([7, 5, 6, 3, 7, 4, 2, 6])
    completion_len = torch.tensor([9, 4, 7, 2, 9, 6, 1, 8])
    prompt_mask = (torch.arange(P)[None] >= (P - prompt_len)[:, None]).long()  # [N, P] left padding
    completion_mask = (torch.arange(T)[None] < completion_len[:, None]).long()  # [N, T] right padding
    prompt_ids = torch.randint(4, 100, (N, P), generator=g).masked_fill(prompt_mask == 0, pad_id)
    completion_ids = torch.randint(4, 100, (N, T), generator=g).masked_fill(completion_mask == 0, pad_id)
    return dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny matrices, restored afterwards.

    On a loaded 2-core machine, two OpenMP threads on hidden-size-32 matmuls spend their time waiting for each other
    (measured: 2.7 s instead of 0.02 s per loss-and-backward pair); one thread gives the same numbers.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def both_losses(
    trainer,
    loss_type: str,
    beta: float,
    eps_high: float,
    ratio_weighted_penalty: bool = False,
    sampler_weights: Callable[..., torch.Tensor] | None = None,
):
    """TRL's ``_compute_loss`` and ours on one hand-made batch, each followed by ``backward``.

    ``sampler_weights(old, mask)``, when given, makes the vLLM importance weights both sides apply (TRL's
    ``inputs["importance_sampling_ratio"]`` with ``use_vllm`` and ``vllm_importance_sampling_correction`` on).

    Returns ``(trl_loss, trl_grads, our_loss, our_grads, clip_fractions, penalty)``.
    """
    model = trainer.model
    batch = hand_made_batch(trainer.processing_class.pad_token_id)
    mask = batch["completion_mask"]

    # Current log-probs (no grad) only to build old/ref log-probs near them: the ratio spans ~[0.55, 1.8].
    with torch.no_grad():
        current = score_completions(model, **batch, temperature=TEMPERATURE).logps
    g = torch.Generator().manual_seed(1)
    old = (current + (torch.rand(N, T, generator=g) - 0.5) * 1.2) * mask  # TRL's logps are 0 on padding
    ref = (current + (torch.rand(N, T, generator=g) - 0.5) * 0.6) * mask
    advantages = torch.tensor([1.2, -0.7, 0.4, -0.9, -1.1, 0.8, 0.3, 0.0])

    # TRL
    inputs = dict(batch, advantages=advantages, old_per_token_logps=old, num_items_in_batch=mask.sum())
    if beta > 0:
        inputs["ref_per_token_logps"] = ref
    weights = None if sampler_weights is None else sampler_weights(old, mask)
    if weights is not None:
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True  # the loss's only vLLM switch
        inputs["importance_sampling_ratio"] = weights
    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = grads(model)

    # Ours, on the same model object
    model.zero_grad(set_to_none=True)
    scores = score_completions(model, **batch, temperature=TEMPERATURE)
    rollout = Rollout(prompts=[], completions=[""] * N, group_size=G, old_logps=old, **batch)
    models = PolicyModels(policy=model, tokenizer=trainer.processing_class, temperature=TEMPERATURE)
    penalty = ReferenceKL(beta=beta).penalty(scores, rollout, PenaltyInputs(ref_logps=ref), models)
    per_token_penalty = penalty.per_token
    if ratio_weighted_penalty:
        per_token_penalty = per_token_penalty * torch.exp(scores.logps - old)
    loss, ratio = policy_loss(
        scores.logps,
        old,
        advantages,
        mask.float(),
        per_token_penalty,
        EPSILON,
        eps_high,
        LOSS_TYPES[loss_type],
        T,
        weights,
    )
    loss.backward()
    clips = clip_fractions(ratio.detach(), advantages, mask.float(), EPSILON, eps_high)
    return trl_loss, trl_grads, loss, grads(model), clips, penalty


def assert_same(trl_loss, trl_grads, our_loss, our_grads) -> None:
    assert abs(our_loss.item() - trl_loss.item()) < LOSS_ATOL, (our_loss.item(), trl_loss.item())
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, expected in trl_grads.items():
        err = (our_grads[name] - expected).abs().max().item()
        assert err <= GRAD_RTOL * expected.abs().max().item() + 1e-7, f"{name}: max abs diff {err}"


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_and_gradients_match_trl(model_dir: Path, tmp_path: Path, loss_type: str, beta: float) -> None:
    eps_high = EPSILON_HIGH[loss_type]
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, beta=beta, epsilon_high=eps_high)
    assert (trainer.ref_model is not None) == (beta > 0)
    trl_loss, trl_grads, loss, our_grads, clips, penalty = both_losses(trainer, loss_type, beta, eps_high)
    # Both clip sides are exercised, so the min/clamp branches are really compared.
    assert clips["low"] > 0 and clips["high"] > 0
    assert_same(trl_loss, trl_grads, loss, our_grads)
    if beta > 0:  # the KL metric is the same masked mean of k3
        assert penalty.metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)


def test_trl_default_bias_corrected_kl_is_ratio_times_ours(model_dir: Path, tmp_path: Path) -> None:
    """With TRL's default ``use_bias_correction_kl=True`` its loss is ours with the penalty times ``R``.

    Without that factor (our :class:`ReferenceKL` as is) the gradients differ well beyond rounding.
    """
    trainer = make_trainer(
        model_dir, tmp_path, loss_type="grpo", beta=0.04, epsilon_high=0.28, use_bias_correction_kl=True
    )
    trl_loss, trl_grads, loss, our_grads, _, _ = both_losses(trainer, "grpo", 0.04, 0.28, ratio_weighted_penalty=True)
    assert_same(trl_loss, trl_grads, loss, our_grads)
    _, trl_grads, _, plain_grads, *_ = both_losses(trainer, "grpo", 0.04, 0.28)  # our ReferenceKL as is
    worst = max((plain_grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in trl_grads.items())
    assert worst > 100 * GRAD_RTOL  # a real difference in the update (~0.8% here with beta=0.04), not rounding


def test_left_padded_positions_do_not_matter_for_rope(model_dir: Path) -> None:
    """Our ``cumsum(mask) - 1`` positions and TRL's implicit ``arange`` give the same log-probs on a RoPE model."""
    model = load_causal_lm(str(model_dir))
    batch = hand_made_batch(load_tokenizer(str(model_dir)).pad_token_id)
    with torch.no_grad():
        ours = score_completions(model, **batch, temperature=TEMPERATURE).logps
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=T + 1).logits[:, :-1] / TEMPERATURE
        arange = logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = batch["completion_mask"].bool()
    assert (ours - arange)[mask].abs().max() < 1e-5


def test_scores_match_generate(model_dir: Path) -> None:
    """Our log-probs are the temperature-scaled log-softmax of the logits ``generate`` used, with left padding."""
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir)).eval()
    enc = tok(
        ["Problem: 12+3-4\nSolution:", "Problem: 5\nSolution:", "1+1="],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    assert (enc["attention_mask"] == 0).any()  # really left-padded
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=T,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
    completion_ids = out.sequences[:, enc["input_ids"].shape[1] :]  # [n, T]
    completion_mask, _ = completion_mask_from_eos(completion_ids, eos_ids(tok))
    logits = torch.stack(out.logits, dim=1) / TEMPERATURE  # [n, T, V] raw logits of each step
    expected = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        scores: Scores = score_completions(
            model, enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, temperature=TEMPERATURE
        )
    mask = completion_mask.bool()
    assert (scores.logps - expected)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_match_trl(model_dir: Path, tmp_path: Path, scale_rewards: str) -> None:
    """TRL's advantages from ``_generate_and_score_completions`` equal ``group_normalize`` on the same rewards."""
    # Group 1 has spread, group 2 is all-equal (std 0: TRL and we both add eps = 1e-4 and give 0).
    fixed = [1.0, 0.0, 0.5, 0.0, 0.25, 0.25, 0.25, 0.25]

    def fixed_reward(completions, **kwargs):
        return list(fixed[: len(completions)])

    trainer = make_trainer(model_dir, tmp_path, beta=0.0, scale_rewards=scale_rewards, _reward=fixed_reward)
    rows = [{"prompt": p} for p in ("Problem: 1+2\nSolution:", "Problem: 7-3\nSolution:") for _ in range(G)]
    out = trainer._generate_and_score_completions(rows)
    expected = group_normalize(torch.tensor(fixed), G, scale_rewards, eps=1e-4)
    torch.testing.assert_close(out["advantages"].float(), expected, atol=1e-6, rtol=1e-6)


# ----- the vLLM importance-sampling correction (TRL's vllm_importance_sampling_correction) -------------------------


def vllm_like_logps(old: torch.Tensor, mask: torch.Tensor, spread: float, seed: int = 2) -> torch.Tensor:
    """``[N, T]`` log-probs of a "sampler" near ``old``: ``old + U(-spread, spread)`` at real tokens, 0 at padding."""
    g = torch.Generator().manual_seed(seed)
    return (old + (torch.rand(old.shape, generator=g) * 2 - 1) * spread) * mask


@pytest.mark.parametrize("mode", IS_MODES)
def test_vllm_importance_weights_match_trl(model_dir: Path, tmp_path: Path, mode: str) -> None:
    """TRL's ``importance_sampling_ratio`` equals :meth:`ImportanceCorrection.weights` on the same log-probs.

    TRL forms the ratio inline in ``_generate_and_score_completions``; that method is run with ``use_vllm`` switched
    on after construction and ``_generate_single_turn`` (where vLLM would generate) replaced by fixed completions
    without EOS and fixed "vLLM" log-probs: the trainer's own old log-probs (from a first call) plus noise, one of
    them NaN (a token vLLM did not score: ratio 1 on both sides). Both clip bounds are hit.
    """
    clip = (0.8, 1.25)
    trainer = make_trainer(
        model_dir,
        tmp_path,
        beta=0.0,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=clip[0],
        vllm_importance_sampling_clip_max=clip[1],
    )
    trainer.use_vllm = True  # the generation it would switch to is replaced below
    lengths = [9, 4, 7, 2, 9, 6, 1, 8]
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]  # EOS is id 2: none here
    vllm_logps: list[list[float]] = [[0.0] * n for n in lengths]
    trainer._generate_single_turn = lambda *args, **kwargs: (completions, vllm_logps)
    rows = [{"prompt": f"Problem: {i}+{i + 1}\nSolution:"} for i in range(N)]
    first = trainer._generate_and_score_completions(rows)
    sampler = vllm_like_logps(first["old_per_token_logps"], first["completion_mask"], 0.4)  # [N, T]
    sampler[2, 3] = math.nan
    vllm_logps[:] = [sampler[i, :n].tolist() for i, n in enumerate(lengths)]
    out = trainer._generate_and_score_completions(rows)
    ours = ImportanceCorrection(mode, *clip).weights(out["old_per_token_logps"], sampler, out["completion_mask"])
    torch.testing.assert_close(ours, out["importance_sampling_ratio"], atol=1e-6, rtol=1e-6)
    assert ours.shape == ((N, T) if mode.startswith("token") else (N, 1))
    if mode.endswith("truncate"):
        assert (ours == clip[0]).any() and (ours == clip[1]).any()
    else:
        assert (ours == 0).any() and ((ours > clip[0]) & (ours < clip[1])).any()
    if mode.startswith("token"):
        assert ours[2, 3] == 1.0  # the NaN token


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_and_gradients_with_vllm_importance_weights_match_trl(
    model_dir: Path, tmp_path: Path, loss_type: str, mode: str
) -> None:
    """TRL multiplies the per-token policy loss by the weights, then adds ``beta * KL`` unweighted; so do we.

    With ``beta = 0.04`` a weighted KL term would show in the gradients. The weights are far from 1 (a sampler
    0.5 nats off per token), so that ignoring them on either side would break the comparison too.
    """
    eps_high = EPSILON_HIGH[loss_type]
    trainer = make_trainer(model_dir, tmp_path, loss_type=loss_type, beta=0.04, epsilon_high=eps_high)

    def weights(old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = importance_weights(old, vllm_like_logps(old, mask, 0.5), mask, mode, 0.7, 1.4)
        assert (w != 1).float().mean() > 0.5  # most weights really differ from 1
        return w

    trl_loss, trl_grads, loss, our_grads, _, _ = both_losses(
        trainer, loss_type, 0.04, eps_high, sampler_weights=weights
    )
    assert_same(trl_loss, trl_grads, loss, our_grads)


# ----- math accuracy: our MathAccuracy against TRL's accuracy_reward (both on math-verify) --------------------------

MATH_PARITY_CASES = [  # (completion, gold answer): one boxed answer each, right and wrong ones
    (r"The answer is \boxed{\frac{1}{2}}", "0.5"),
    (r"so \boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"\boxed{2^{1/2}}", r"\sqrt{2}"),
    (r"\boxed{-7}", "-7"),
    (r"\boxed{7}", "-7"),
    (r"\boxed{2\pi}", r"2\pi"),
    (r"\boxed{6.28}", r"2\pi"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{0.33}", r"\frac{1}{3}"),
    (r"\boxed{12}", "1.2"),
    (r"\boxed{x^2+2x+1}", r"(x+1)^2"),
    (r"\boxed{(1,2)}", r"(1,2)"),
    (r"\boxed{5\text{ cm}}", "5"),
    (r"\boxed{\frac{10}{4}}", r"\frac{5}{2}"),
    (r"no box here, 42", "42"),
    (r"\boxed{3}", r"\frac{6}{2}"),
    (r"\boxed{\{1,2\}}", r"\{2,1\}"),
    (r"\boxed{4}", "4.0"),
]


def test_math_accuracy_matches_trl_accuracy_reward():
    """Same verdicts as TRL's ``accuracy_reward`` when both read the gold the same way.

    TRL parses the gold as a solution text, so LaTeX must be delimited (``$\\sqrt{2}$``); otherwise it returns
    ``None`` (skip). Our ``gold_style="plain"`` reads the bare answer column. Both grade the boxed answer; with no
    box, ours is told not to fall back to the last number (TRL has no such fallback).
    """
    from trl.rewards import accuracy_reward

    from gcpo_lightning.rewards.math import MathAccuracy

    completions, golds = [c for c, _ in MATH_PARITY_CASES], [g for _, g in MATH_PARITY_CASES]
    theirs = accuracy_reward([[{"content": c}] for c in completions], [f"${g}$" for g in golds])
    ours = MathAccuracy(fallback_to_last_number=False)(prompts=[""] * len(golds), completions=completions, answer=golds)
    assert ours == theirs
    assert 0 < sum(ours) < len(ours)  # both verdicts occur
