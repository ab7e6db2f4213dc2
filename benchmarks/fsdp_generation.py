"""Generation under FSDP2: all-gathering at every token vs once per rollout (``full_parameters``), measured.

    python benchmarks/fsdp_generation.py [--ranks 2] [--tokens 64] [--backend gloo]

Spawns ``--ranks`` processes (gloo on CPU, nccl with ``--backend nccl`` on GPUs), shards a random 4-layer Llama
with :func:`gcpo_lightning.policy.sharding.shard_policy` and generates ``--tokens`` tokens for 8 prompts per rank, once
with the sharded model as it is (every forward all-gathers every layer) and once inside ``full_parameters``
(one all-gather for the whole generation). ``min_new_tokens`` forces equal lengths on every rank, which the
per-token variant needs to avoid a hang; the module itself always uses ``full_parameters``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from gcpo_lightning.components.sampling.decoding import decode
    from gcpo_lightning.policy.sharding import full_parameters, shard_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    device = "cuda" if args.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = LlamaForCausalLM(config).to(device)
    mesh = init_device_mesh(device, (args.ranks,), mesh_dim_names=("data_parallel",))
    shard_policy(model, mesh)
    prompts = torch.randint(0, 4096, (8, 16), device=device)
    mask = torch.ones_like(prompts)

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            decode(model.eval(), prompts, mask, args.tokens, [0], 1, min_new_tokens=args.tokens)
        dist.barrier()
        return time.perf_counter() - start

    generate()  # warm-up (lazy FSDP initialisation)
    per_token = generate()
    with full_parameters(model):
        once = generate()
    if rank == 0:
        print(
            f"{args.ranks} ranks ({args.backend}), 8 prompts x {args.tokens} tokens per rank: "
            f"all-gather per token {per_token:.2f} s, gathered once (full_parameters) {once:.2f} s "
            f"({per_token / once:.1f}x)"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    mp.spawn(worker, args=(args,), nprocs=args.ranks)


if __name__ == "__main__":
    main()
