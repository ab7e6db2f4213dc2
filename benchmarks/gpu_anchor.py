"""GRPO and GCPO at the anchor shape on a GPU: a Qwen2.5-0.5B-shaped random model, 8 prompts x G = 8, 256 tokens.

    python benchmarks/gpu_anchor.py                                  # CUDA, bf16-mixed: GRPO, then GCPO variants
    python benchmarks/gpu_anchor.py --compare default,set_query --settings 8,2,1 4,4,4
    python benchmarks/gpu_anchor.py --cpu --tiny --steps 2           # dry run on the CPU (catches script errors)

The model is random, nothing is downloaded: Qwen2.5-0.5B's sizes (hidden 896, 24 layers, 14 query and 2 KV heads
of 64, MLP 4864, vocabulary 151,936, tied embeddings, q/k/v biases, rope theta 1e6; ``--tiny``: 2 layers, hidden 64,
the same vocabulary) in Hugging Face's Llama classes, saved with a word-level tokenizer over the same vocabulary.
Llama, not Qwen2: for a ``qwen2`` config ``AutoTokenizer`` loads its Qwen2 tokenizer class, which replaces the
saved pre-tokenizer with Qwen's (every digit its own token), so "w63000" would come back as 6 tokens; Llama's
layers differ from Qwen2's only by a bias on the output projection. Every id decodes to a word that encodes
back to that id, so GCPO's textual contexts, which hold the candidates as text, re-tokenize exactly. A random model
almost never samples EOS (about 1 / 151,936 per token), so every completion is ``--tokens`` long: the worst case
of the shape. Rewards are a hash of the completion, uniform in [0, 1), so advantages, causal weights and the update
are those of a real step, not zeros.

Every run is ``configs/grpo.yaml`` or ``configs/gcpo.yaml`` with this model, ``--tokens`` completion tokens and
``trainer.precision=bf16-mixed`` on one GPU, run and timed by ``benchmarks/gcpo_overhead.py`` (one process per
run, the first step dropped, the median of the others; ``--compare`` names its variants). Prints one line per run:
the step (the sum of the logged phases), its ratio to GRPO, each phase and tokens/s, peak CUDA memory.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gcpo_overhead  # noqa: E402

VOCAB = 151_936
QWEN05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def hash_reward(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    """A reward uniform in [0, 1) from a hash of prompt and completion: varied, deterministic, costless."""
    digests = (hashlib.blake2b(f"{p}\x00{c}".encode(), digest_size=8).digest() for p, c in zip(prompts, completions))
    return [int.from_bytes(d, "little") / 2**64 for d in digests]


def prompt_words() -> list[str]:
    """The pieces the word-level pre-tokenizer cuts the arithmetic prompts and GCPO's context templates into."""
    import string

    return sorted(set(string.ascii_letters + string.digits + string.punctuation))


def save_random_qwen(path: Path, tiny: bool = False, seed: int = 0) -> Path:
    """A random Llama of Qwen2.5-0.5B's shape (``tiny``: 2 small layers) and its word tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [*SPECIALS, *prompt_words()]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # "Problem: 3+4" -> Problem : 3 + 4 (template words and numbers of several digits are <unk>). No digit split:
    # it would cut every "w123" into 4 tokens and make the contexts 4-6x longer than the completions they hold.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=2,
        head_dim=(TINY if tiny else QWEN05B)["hidden_size"] // (TINY if tiny else QWEN05B)["num_attention_heads"],
        attention_bias=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **(TINY if tiny else QWEN05B),
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def overrides(model_dir: Path, tokens: int, cpu: bool) -> list[str]:
    """The command-line overrides that put a config on this model, this length, bf16 and one GPU."""
    device = ["--trainer.accelerator=cpu"] if cpu else ["--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed"]
    return [
        *device,
        "--trainer.devices=1",
        "--trainer.callbacks=[]",
        f"--model.policy_builder.model_name_or_path={model_dir}",
        "--model.policy_builder.use_chat_template=false",
        "--model.reward_funcs=[gpu_anchor.hash_reward]",
        "--model.reward_weights=[1.0]",
        f"--model.sampler.init_args.max_completion_length={tokens}",
        "--model.log_completions_every_n_steps=0",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps per run; the first is dropped")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="completion tokens (and context-sample tokens)")
    parser.add_argument("--settings", nargs="+", default=["8,2,1"], help="G,M,K")
    parser.add_argument("--compare", default="default", help=f"variants of {sorted(gcpo_overhead.VARIANTS)}")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="one more override for every run, repeatable: --extra=--model.micro_batch_size=8",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a dry run of the script)")
    parser.add_argument("--tiny", action="store_true", help="2 small layers instead of Qwen2.5-0.5B's 24")
    args = parser.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_anchor.py needs CUDA (or --cpu for a dry run)")
    gpu = "CPU" if args.cpu else torch.cuda.get_device_name()
    print(
        f"machine: {gpu}, {platform.processor() or platform.machine()} {os.cpu_count()} cores; "
        f"torch {torch.__version__}; "
        f"{'tiny' if args.tiny else 'Qwen2.5-0.5B'}-shaped random model; {args.prompts} prompts x G, {args.tokens} "
        f"tokens; {'fp32' if args.cpu else 'bf16-mixed'}",
        flush=True,
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir = save_random_qwen(Path(tmp) / "qwen", tiny=args.tiny)
        print(f"random model saved in {time.perf_counter() - start:.1f} s", flush=True)
        common = overrides(model_dir, args.tokens, args.cpu) + args.extra
        print(f"{'method':36s} {'step s':>7s} {'x GRPO':>7s}  phases (s)", flush=True)
        for setting in args.settings:
            G, M, K = (int(x) for x in setting.split(","))
            grpo = gcpo_overhead.run(
                "configs/grpo.yaml", args.steps, args.prompts, [*common, f"--model.num_generations={G}"], None
            )
            print(f"{f'GRPO G={G}':36s} {grpo['step']:7.2f} {1.0:7.2f}  {gcpo_overhead.fmt(grpo)}", flush=True)
            for name in args.compare.split(","):
                gcpo = gcpo_overhead.run(
                    "configs/gcpo.yaml",
                    args.steps,
                    args.prompts,
                    [*common, *gcpo_overhead.gcpo_setting(G, M, K), *gcpo_overhead.VARIANTS[name]],
                    None,
                )
                ratio = gcpo["step"] / grpo["step"]
                label = f"GCPO G={G} M={M} K={K} {name}"
                print(f"{label:36s} {gcpo['step']:7.2f} {ratio:7.2f}  {gcpo_overhead.fmt(gcpo)}", flush=True)


if __name__ == "__main__":
    main()
