"""The scaling options inside the module: LoRA with an adapter-off reference, a 4-bit reference, gradient
checkpointing, chunked log-probs, bf16 autocast and the Hugging Face export (single process, CPU)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from gcpo_lightning import ArithmeticDataModule, ReferenceKL
from gcpo_lightning.policy.lora import DisabledAdapterReference, LoRAConfig
from gcpo_lightning.policy.quantization import QuantizationConfig, count_4bit_linears
from gcpo_lightning.training.callbacks import HFExport


def one_rollout(module):
    """A sampled, scored rollout of two prompts and its GRPO advantages (the policy is loaded first)."""
    module.configure_model()
    torch.manual_seed(0)
    rows = ArithmeticDataModule(num_train=8, num_val=2).load_rows()[0][:2]
    rollout = module.sampler.sample(module.models(), module.prompts_for(rows), module.num_generations)
    rollout.rows = rows
    rewards, _ = module.score_rewards(rollout)
    return rollout, torch.linspace(-1, 1, len(rewards))


def loss_and_grads(module, rollout, adv):
    module.policy.zero_grad()
    prepared = module.kl.prepare(rollout, None, module.models())
    loss = module.compute_loss(rollout, adv, prepared, module.models())[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_lora_trains_only_adapters_and_the_reference_is_the_base(make_module, fit, tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, lora=LoRAConfig(r=4, init_weights=False))
    module.configure_model()
    assert isinstance(module.reference, DisabledAdapterReference)  # no second copy of the weights
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit(module, tmp_path, steps=2)
    after = module.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), changed
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(3, 30, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(module.reference(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_4bit_reference_fits(make_module, fit, tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, reference_quantization=QuantizationConfig())
    fit(module, tmp_path, steps=1)
    assert count_4bit_linears(module.reference) > 0 and count_4bit_linears(module.policy) == 0
    # one step: the policy is still the fp32 checkpoint, the reference its NF4 copy, so their k3 is > 0; a reference
    # that silently were the policy (or the KL not computed) would log exactly 0
    assert module.trainer.logged_metrics["kl"].item() > 0


def test_4bit_policy_without_lora_is_refused(make_module, tiny_model_dir):
    with pytest.raises(ValueError, match="quantization .* needs lora"):
        make_module(tiny_model_dir, quantization=QuantizationConfig())


@pytest.mark.parametrize("option", [{"gradient_checkpointing": True}, {"logits_chunk_size": 3}])
def test_memory_options_leave_loss_and_gradients_unchanged(make_module, tiny_model_dir, option):
    plain = make_module(tiny_model_dir, kl=ReferenceKL(beta=0.04))
    rollout, adv = one_rollout(plain)
    loss, grads = loss_and_grads(plain, rollout, adv)
    other = make_module(tiny_model_dir, kl=ReferenceKL(beta=0.04), **option)
    other.configure_model()
    assert other.policy.is_activation_checkpointing == bool(option.get("gradient_checkpointing"))
    loss2, grads2 = loss_and_grads(other, rollout, adv)
    torch.testing.assert_close(loss2, loss)
    assert grads.keys() == grads2.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_step_on_cpu(make_module, tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    trainer = L.Trainer(
        max_steps=1,
        precision="bf16-mixed",
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ArithmeticDataModule(batch_size=2, num_train=16, num_val=2))
    assert torch.isfinite(trainer.logged_metrics["loss"])
    assert next(module.policy.parameters()).dtype == torch.float32  # autocast: weights stay fp32


def test_export_callback_writes_a_loadable_folder(make_module, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = make_module(tiny_model_dir)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[HFExport(dirpath=str(tmp_path / "hf"))],
    )
    trainer.fit(module, ArithmeticDataModule(batch_size=2, num_train=16, num_val=2))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, value in module.policy.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").pad_token_id == module.tokenizer.pad_token_id


@pytest.mark.slow
def test_chunked_logits_leave_a_gcpo_step_unchanged(make_module, fit, tiny_model_dir, tmp_path):
    from gcpo_lightning import CausalAdvantage, CausalProjectedKL, ColliderGraphBuilder

    results = []
    for chunk in (None, 2):
        L.seed_everything(0)
        module = make_module(
            tiny_model_dir,
            graph_builder=ColliderGraphBuilder(num_integrated=2),
            adjuster=CausalAdvantage(),
            kl=CausalProjectedKL(policy_context="context"),
            logits_chunk_size=chunk,
            log_completions_every_n_steps=0,
        )
        trainer = fit(module, tmp_path / str(chunk), steps=1)
        results.append((trainer.logged_metrics, module.policy.state_dict()))
    (m1, w1), (m2, w2) = results
    for name in ("loss", "kl", "causal_kl", "advantages/mean"):  # float rounding only (other matmul shapes)
        torch.testing.assert_close(m2[name], m1[name], rtol=1e-4, atol=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
