"""Integration tests of `safe_dual.train`: parity with TRL's DPOTrainer, resuming, and properties of the losses."""
import copy
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from transformers import TrainerCallback

from safe_dual.console import show_progress
from safe_dual.toy import load_toy_world, one_thread, toy_preferences
from safe_dual.train import (PseudoPreferenceConfig, PseudoPreferenceTrainer, combined_rewards, dpo_loss,
                             listwise_loss, pseudo_preference_lists, pseudo_preference_pairs, soft_dpo_loss)


@pytest.fixture(autouse=True)
def _one_thread():
    "Tiny models: one thread is faster than several, and the cores are shared; restored after each test."
    with one_thread(torch.device("cpu")): yield


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


def config(output_dir, **kwargs):
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6, logging_steps=3, save_strategy="no",
                    disable_tqdm=True, seed=0)
    return PseudoPreferenceConfig(output_dir=str(output_dir), **(settings | kwargs))


def test_trl_parity(tmp_path, world):
    "Plain DPO: our loss, log-prob terms and margins equal TRL's DPOTrainer on the same policy, reference and batch."
    from trl import DPOConfig, DPOTrainer
    ref, policy = world.new_model(), world.new_model()
    with torch.no_grad():
        for p in policy.parameters(): p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    # TRL tokenizes prompt + completion as one string: completions start with a space
    pairs = toy_preferences(world, 8).select_columns(["prompt", "chosen", "rejected"])
    pairs = pairs.map(lambda row: {"chosen": " " + row["chosen"], "rejected": " " + row["rejected"]})
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), train_dataset=pairs, processing_class=world.tokenizer,
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=8, bf16=False,
                                    report_to="none"))
    ours = PseudoPreferenceTrainer(copy.deepcopy(ref), world.tokenizer, pairs, config(tmp_path / "ours", beta=0.3, use_lora=False,
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


def test_resume_equals_uninterrupted(tmp_path, world):
    "Interrupt at step 3 of 6 and resume from the checkpoint: the final adapter equals an uninterrupted run's."
    pairs = toy_preferences(world, 32)
    # soft labels, and "sampled" draws fresh Bernoulli labels every step: resuming must restore the random state too
    pairs = pairs.add_column("label", np.random.default_rng(0).uniform(size=len(pairs)).tolist())

    def run(output_dir, **kwargs):
        trainer = PseudoPreferenceTrainer(world.new_model(), world.tokenizer, pairs, config(output_dir, loss_type="sampled", save_steps=3,
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


@pytest.mark.parametrize("quiet", [False, True])
def test_training_output(tmp_path, world, capfd, recwarn, quiet):
    "One step bar with the loss (none under `show_progress(False)`), no raw log dicts, no pin_memory warning, threads kept."
    threads = torch.get_num_threads()
    pairs = toy_preferences(world, 16)
    trainer = PseudoPreferenceTrainer(world.new_model(), world.tokenizer, pairs, config(tmp_path, disable_tqdm=False))
    capfd.readouterr()
    with show_progress(not quiet): trainer.train()
    out, err = capfd.readouterr()
    assert "{'" not in out + err and "pin_memory" not in err, out + err
    assert not [w for w in recwarn if "pin_memory" in str(w.message) or "is_gradient_checkpointing" in str(w.message)]
    assert ("train: 100%" in err and "loss=" in err) != quiet, err
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("settings, message", [
    (dict(learning_rate=-1e-2), "`learning_rate` must be > 0; got -0.01"),                     # T1
    (dict(learning_rate="fast"), "`learning_rate` must be a number; got 'fast'"),                # T7 (a non-number string)
    (dict(num_train_epochs=-1), "`num_train_epochs` must be > 0"),                               # T8
    (dict(num_train_epochs=0), "`num_train_epochs` must be > 0 (0 epochs would train nothing)"), # T9
    (dict(per_device_train_batch_size=0), "`per_device_train_batch_size` must be >= 1; got 0"),  # T10
    (dict(learning_rate=float("nan")), "`learning_rate` must be > 0; got nan"),                  # T11
    (dict(learning_rate=float("inf")), "`learning_rate` must be < inf; got inf"),
    (dict(max_steps=0), "`max_steps` must be != 0"),
    (dict(gradient_accumulation_steps=0), "`gradient_accumulation_steps` must be >= 1"),
])
def test_config_refuses_at_construction(tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)): PseudoPreferenceConfig(output_dir=str(tmp_path), **settings)


def test_config_reads_numbers_in_strings(tmp_path):
    "T7: YAML 1.1 reads 3e-3 as a string; the config takes it as the number."
    args = PseudoPreferenceConfig(output_dir=str(tmp_path), learning_rate="3e-3", num_train_epochs="2", per_device_train_batch_size="8")
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (0.003, 2.0, 8)


@pytest.mark.parametrize("lam, message", [
    ([float("nan")], "`lam` must be finite and >= 0"), ([float("inf")], "`lam` must be finite and >= 0"),  # T23
    ([-0.5], "`lam` must be finite and >= 0"), ([0.5, 1.0], "`lam` has shape (2,)"), (None, "`lam` is None"),
])
@pytest.mark.parametrize("build", [combined_rewards, pseudo_preference_pairs, pseudo_preference_lists])
def test_labels_refuse_bad_lam(lam, message, build):
    responses = Dataset.from_dict({"prompt_id": [0, 0, 0], "prompt": ["p"] * 3, "response": ["a", "b", "c"],
                                   "reward": [1.0, 2.0, 3.0], "safety": [0.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match=re.escape(message)): build(responses, lam)
