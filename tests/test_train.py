"""Integration tests of `safe_dual.train`: parity with TRL's DPOTrainer, resuming, and properties of the losses."""
import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from safe_dual.data import response_logprobs
from safe_dual.train import (PseudoPreferenceConfig, PseudoPreferenceTrainer, dpo_loss, listwise_loss,
                             pseudo_preference_pairs, soft_dpo_loss)

VOCAB = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(24)]


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=None))


def text_pairs(n, seed=0):
    "Completions start with a space: TRL tokenizes prompt + completion as one string."
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"w{i}" for i in rng.integers(0, 24, k))
    rows = [(words(rng.integers(2, 5)), " " + words(rng.integers(1, 4)), " " + words(rng.integers(1, 4))) for _ in range(n)]
    return Dataset.from_dict({k: [r[i] for r in rows if r[1] != r[2]] for i, k in enumerate(("prompt", "chosen", "rejected"))})


def config(output_dir, **kwargs):
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6, logging_steps=3, save_strategy="no",
                    disable_tqdm=True, dataloader_pin_memory=False, seed=0)
    return PseudoPreferenceConfig(output_dir=str(output_dir), **(settings | kwargs))


def test_trl_parity(tmp_path):
    "Plain DPO: our loss, log-prob terms and margins equal TRL's DPOTrainer on the same model, reference and batch."
    from trl import DPOConfig, DPOTrainer
    tokenizer, ref, policy, pairs = tiny_tokenizer(), tiny_llama(0), tiny_llama(1), text_pairs(8)
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=pairs, processing_class=tokenizer,
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=8, bf16=False,
                                    report_to="none"))
    ours = PseudoPreferenceTrainer(copy.deepcopy(ref), tokenizer, pairs, config(tmp_path / "ours", beta=0.3, use_lora=False,
                                                                                 loss_type="hard"))
    ours.model.load_state_dict(policy.state_dict())  # reference log-probs were precomputed from `ref`
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[col] == trl.train_dataset[col]  # same tokenization of the text pairs
    trl_batch, batch = trl.data_collator(list(trl.train_dataset)), ours.data_collator(list(ours.train_dataset))
    trl.model.train(), ours.model.train()
    trl_loss = trl.compute_loss(trl.model, trl_batch)
    loss, out = ours.compute_loss(ours.model, batch, return_outputs=True)
    with torch.no_grad():
        trl_logps = torch.cat(trl.compute_ref_log_probs(trl.model, trl_batch))
        trl_ref_logps = torch.cat(trl.compute_ref_log_probs(trl.ref_model, trl_batch))
    diffs = {"loss": (loss - trl_loss).abs().item(), "logps": (out["logps"] - trl_logps).abs().max().item(),
             "ref_logps": (batch["ref_logps"] - trl_ref_logps).abs().max().item()}
    chosen, rejected = out["logps"].chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
    margins = 0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    diffs["logps/chosen"] = abs(chosen.mean().item() - trl._metrics["train"]["logps/chosen"][-1])
    diffs["logps/rejected"] = abs(rejected.mean().item() - trl._metrics["train"]["logps/rejected"][-1])
    diffs["rewards/margins"] = abs(margins.mean().item() - trl._metrics["train"]["rewards/margins"][-1])
    print("max abs diff vs TRL:", diffs)
    assert trl_loss.item() != pytest.approx(np.log(2), abs=1e-3)  # the policy differs from the reference
    assert max(diffs.values()) < 1e-5, diffs


class StopAt(TrainerCallback):
    "Interrupt training after `step` optimizer steps (the checkpoint of that step is written first)."
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step: control.should_training_stop = True


def test_resume_equals_uninterrupted(tmp_path):
    "Interrupt at step 3 of 6 and resume from the checkpoint: the final adapter equals an uninterrupted run's."
    tokenizer = tiny_tokenizer()
    scored = Dataset.from_dict({"prompt_id": [i // 4 for i in range(32)], "prompt": [f"w{i // 4} w{i // 4 + 3}" for i in range(32)],
                                "response": [f"w{(5 * i) % 24} w{i % 7}" for i in range(32)],
                                "reward": np.sin(np.arange(32.0)).tolist(), "safety": np.cos(np.arange(32.0)).tolist()})
    pairs = pseudo_preference_pairs(scored, [0.7])  # soft labels: "sampled" draws fresh Bernoulli labels every step

    def run(output_dir, **kwargs):
        trainer = PseudoPreferenceTrainer(tiny_llama(0), tokenizer, pairs, config(output_dir, loss_type="sampled", save_steps=3,
                                                                                   save_strategy="steps"),
                                          callbacks=kwargs.pop("callbacks", None))
        trainer.train(**kwargs)
        return trainer, {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    _, full = run(tmp_path / "full")
    stopped, partial_weights = run(tmp_path / "cut", callbacks=[StopAt(3)])
    assert stopped.state.global_step == 3 and (tmp_path / "cut" / "checkpoint-3" / "adapter_model.safetensors").exists()
    resumed, weights = run(tmp_path / "cut", resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert any(not torch.equal(partial_weights[k], full[k]) for k in full)  # the test can tell the runs apart
    assert all(torch.equal(weights[k], full[k]) for k in full)


finite = st.floats(-20, 20, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite, finite, st.floats(0, 1)), min_size=1, max_size=8), st.floats(0.01, 5))
def test_soft_loss_properties(rows, beta):
    "Swapping the pair flips the label; labels in {0, 1} give DPO; the loss is minimized where sigmoid(beta*Delta) = p."
    c, r, rc, rr, p = (torch.tensor(col, dtype=torch.float64) for col in zip(*rows))
    loss = soft_dpo_loss(c, r, rc, rr, p, beta)
    torch.testing.assert_close(soft_dpo_loss(r, c, rr, rc, 1 - p, beta), loss)
    torch.testing.assert_close(soft_dpo_loss(c, r, rc, rr, torch.ones_like(p), beta), dpo_loss(c, r, rc, rr, beta))
    delta = ((c - rc) - (r - rr)).requires_grad_()
    grad, = torch.autograd.grad(soft_dpo_loss(delta, torch.zeros_like(delta), torch.zeros_like(delta), torch.zeros_like(delta), p, beta).sum(), delta)
    torch.testing.assert_close(grad, beta * (torch.sigmoid(beta * delta) - p).detach())


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.05, 3))
def test_listwise_gradient_is_q_minus_w(n, seed, beta):
    "d loss / d logratio_n = q_n - w_n: zero exactly when the policy's sample distribution matches softmax(scores / beta)."
    g = torch.Generator().manual_seed(seed)
    logps, ref, scores = (torch.randn(3, n, generator=g, dtype=torch.float64) for _ in range(3))
    logps.requires_grad_()
    grad, = torch.autograd.grad(listwise_loss(logps, ref, scores, beta).sum(), logps)
    torch.testing.assert_close(grad, torch.softmax(logps - ref, -1).detach() - torch.softmax(scores / beta, -1))
    at_optimum = (ref + scores / beta + 3.0).requires_grad_()
    grad, = torch.autograd.grad(listwise_loss(at_optimum, ref, scores, beta).sum(), at_optimum)
    torch.testing.assert_close(grad, torch.zeros_like(grad))
