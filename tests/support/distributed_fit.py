"""Driver for the distributed tests: a short GCPO fit, launched as its own process (never imported by pytest).

Lightning relaunches this command line for rank 1 (``ModelParallelStrategy`` on CPU: FSDP2 over gloo), so it must be
a script. Every rank writes what the test checks to ``--out``:

* ``rank<r>_step<s>.pt``: the rewards, the rewards gathered across ranks, the candidate representations and the
  advantages that rank computed at optimiser step ``s``, and the policy's parameter version and gathered weights
  during that step's rollout;
* ``metrics_rank<r>.json``: the logged metrics of every step;
* ``weights.pt`` (rank 0): the full policy weights at the end, and an HF export in ``hf/``.

    python tests/support/distributed_fit.py --model DIR --out DIR --devices 2 --max-steps 4 [--save-at 2] \
        [--resume CKPT] [--lora] [--vllm]

With ``--vllm`` (in ``.venv-vllm``) the sampler is ``VLLMSampler``, one engine per rank, and ``metrics_rank<r>.json``
also holds what ``engine_against_policy`` measured after the fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from custom_components import length_reward  # noqa: E402

from gcpo_lightning import (  # noqa: E402
    ArithmeticDataModule,
    CausalAdvantage,
    CausalProjectedKL,
    ColliderGraphBuilder,
    GCPOModule,
    GroupSampler,
)
from gcpo_lightning.policy.builder import PolicyBuilder  # noqa: E402
from gcpo_lightning.policy.lora import LoRAConfig  # noqa: E402
from gcpo_lightning.policy.quantization import QuantizationConfig, count_4bit_linears  # noqa: E402
from gcpo_lightning.policy.sharding import full_state_dict, gathered_weights, parameter_version  # noqa: E402
from gcpo_lightning.training.callbacks import CheckpointOnSigterm, HFExport  # noqa: E402
from gcpo_lightning.training.metrics import WALL_CLOCK_PREFIXES  # noqa: E402


class RecordingAdvantage(CausalAdvantage):
    """GCPO's causal advantage that also saves its inputs and outputs for the test."""

    out: Path = Path(".")
    module: L.LightningModule | None = None  # set after the module is built: the step counter is read from it

    def adjust(self, rewards, rollout, graph, batch_rewards=None):
        result = super().adjust(rewards, rollout, graph, batch_rewards)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        step = self.module.global_step
        torch.save(
            {
                "rewards": rewards,
                "batch_rewards": batch_rewards,
                "z": graph.representations,
                "context_z": graph.context_representations,
                "advantages": result.values,
                "prompts": rollout.prompts,
                # inside full_parameters (the rollout phase): what VLLMSampler reads to push weights
                "parameter_version": parameter_version(self.module.policy),
                "gathered": {n: t.clone() for n, t in gathered_weights(self.module.policy)},
            },
            self.out / f"rank{rank}_step{step}.pt",
        )
        return result


class MetricsRecorder(L.Callback):
    """Keeps every step's logged metrics (``trainer.logged_metrics``) as plain floats."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        metrics = {
            k: float(v)
            for k, v in trainer.logged_metrics.items()  # wall-clock metrics: not reproducible
            if not k.startswith(WALL_CLOCK_PREFIXES)
        }
        self.rows.append({"step": trainer.global_step, **metrics})
        print(f"STEP {trainer.global_step}", flush=True)  # the SIGTERM test waits for these lines


def vllm_sampler():
    """``VLLMSampler`` with the driver's completion length (imported here: only ``.venv-vllm`` has vLLM)."""
    from gcpo_lightning.components.sampling.vllm_sampler import VLLMSampler

    return VLLMSampler(max_completion_length=8, kv_cache_space_gib=1.0)


def engine_against_policy(module: GCPOModule, dm: ArithmeticDataModule, model_path: str) -> dict:
    """After the fit, this rank's engine against its policy: the weight pushes so far, and how far the engine's
    log-probs of its own samples of this rank's prompts are from the trained policy's and from the initial model's
    (the engine must hold the trained weights, not the ones it was built with)."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from gcpo_lightning.components.sampling.group_sampler import score_rollout
    from gcpo_lightning.policy.sharding import full_parameters

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prompts = module.prompts_for(list(dm.train_dataloader())[rank])  # each rank its own prompts
    pushes, models = module.sampler.weight_pushes, module.models()
    with full_parameters(module.policy):  # collective under FSDP2: every rank calls it
        rollout = module.sampler.sample(models, prompts, 2)  # scored by the trained policy
    real = rollout.completion_mask.bool()
    trained = (rollout.old_logps - rollout.sampler_logps).abs()[real].max()
    initial = dataclasses.replace(models, policy=AutoModelForCausalLM.from_pretrained(model_path))
    score_rollout(initial, rollout, 64)
    before = (rollout.old_logps - rollout.sampler_logps).abs()[real].max()
    return {
        "pushes_during_fit": pushes,
        "pushes": module.sampler.weight_pushes,
        "max_abs_logp_diff_trained": float(trained),
        "max_abs_logp_diff_initial": float(before),
        "prompts": prompts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this many steps")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--logits-chunk-size", type=int, default=None)
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (reference: adapters off)")
    parser.add_argument("--reference-4bit", action="store_true", help="4-bit NF4 reference")
    parser.add_argument("--qlora", action="store_true", help="with --lora: the policy's base in 4-bit")
    parser.add_argument("--fsdp-param-dtype", default=None, help="e.g. bfloat16: FSDP2 mixed precision")
    parser.add_argument("--vllm", action="store_true", help="VLLMSampler, one engine per rank (needs .venv-vllm)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="GCPOModule.micro_batch_tokens")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(0, workers=True)
    adjuster = RecordingAdvantage(alpha=2.0, scale_rewards="batch")
    RecordingAdvantage.out = out
    module = GCPOModule(
        policy_builder=PolicyBuilder(
            args.model,
            logits_chunk_size=args.logits_chunk_size,
            lora=LoRAConfig(r=4) if args.lora else None,
            reference_quantization=QuantizationConfig() if args.reference_4bit else None,
            quantization=QuantizationConfig() if args.qlora else None,
            fsdp_param_dtype=args.fsdp_param_dtype,
        ),
        reward_funcs=[length_reward],
        sampler=vllm_sampler() if args.vllm else GroupSampler(max_completion_length=8),
        graph_builder=ColliderGraphBuilder(num_integrated=2, num_context_samples=1, max_candidate_tokens=8),
        adjuster=adjuster,
        kl=CausalProjectedKL(beta=0.04, kappa=0.06, max_ratio=10.0),
        num_generations=4,
        eval_num_samples=2,
        micro_batch_size=4,
        micro_batch_tokens=args.micro_batch_tokens,
        log_completions_every_n_steps=0,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
    )
    adjuster.module = module
    recorder = MetricsRecorder()
    callbacks = [recorder, HFExport(dirpath=str(out / "hf")), CheckpointOnSigterm(dirpath=str(out / "ckpt"))]
    if args.save_at:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "ckpt",
                every_n_train_steps=args.save_at,
                save_top_k=-1,
                save_last=False,
                filename="{step}",
            )
        )
    strategy = (
        ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1) if args.devices > 1 else "auto"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        val_check_interval=args.max_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(args.save_at),
    )
    dm = ArithmeticDataModule(batch_size=2, num_train=64, num_val=4, val_batch_size=2)
    trainer.fit(module, dm, ckpt_path=args.resume)

    sharded = any(type(p).__name__ == "DTensor" for p in module.policy.parameters())
    state = full_state_dict(module.policy)
    rank = trainer.global_rank
    reference_4bit = args.reference_4bit and count_4bit_linears(module.reference) > 0
    trainable = sorted(n for n, p in module.policy.named_parameters() if p.requires_grad)
    evaluation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary = {
        "rows": recorder.rows,
        "sharded": sharded,
        "reference_4bit": reference_4bit,
        "trainable": trainable,
        "val": evaluation,
    }
    if args.vllm:
        summary["vllm"] = engine_against_policy(module, dm, args.model)
    (out / f"metrics_rank{rank}.json").write_text(json.dumps(summary))
    if trainer.is_global_zero:
        torch.save(state, out / "weights.pt")


if __name__ == "__main__":
    main()
