"""Runs a researcher can trust: stage keys that see model, scorer and threshold changes, stages that survive kills and
half-written files, one run per folder, and bad settings refused before any work (MoCAN and PeCAN on the toy world)."""
import json
import re
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk

import safe_dual.mocan
from safe_dual.dual import solve_dual
from safe_dual.mocan import MoCAN
from safe_dual.runs import RunFolderBusyError, checkpoint_problem
from safe_dual.pipeline import DualNotConvergedError
from safe_dual.pecan import PeCAN
from safe_dual.toy import load_toy_world, exact_metrics, toy_preferences

TINY = dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, max_steps=4, per_device_train_batch_size=8,
            save_strategy="no", disable_tqdm=True)
# checkpoints every 2 of 6 steps, so that a run killed at its second checkpoint leaves checkpoint-2 and checkpoint-4
CHECKPOINTED = dict(TINY, max_steps=6, save_strategy="steps", save_steps=2)
THRESHOLDS, NEW_THRESHOLDS = (-0.25, -0.4), (-0.3, -0.45)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


def mocan(world, out, policy=None, scorers=None, thresholds=THRESHOLDS, train_args=TINY, evaluator=None, **kwargs):
    "A seconds-long MoCAN on the toy world: 4 samples per prompt, a few full-model listwise steps, exact evaluation."
    scorers = scorers or dict(reward=world.reward_scorer, safety=world.safety_scorers)
    return MoCAN(policy or world.new_model(), world.tokenizer, world.prompts, scorers, thresholds, 1.0, n_samples=4,
                 output_dir=out, max_new_tokens=world.max_new_tokens, batch_size=64, train_args=train_args,
                 evaluator=evaluator or (lambda model: exact_metrics(model, world)), bootstrap=0, **kwargs)


def stamps(out):
    "mtime of every stage.json in a run folder, by stage."
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in Path(out).rglob("stage.json")}


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("safe_dual")]


def state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    "A finished MoCAN run folder and its result; tests copy the folder before changing it."
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, mocan(world, out).run()


def copy_of(folder, tmp_path):
    "A copy of a run folder to change, without the source's lock files."
    dest = tmp_path / "run"
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".lock*"))
    return dest


def child(script, *args):
    "A Python subprocess running `script` (dedented) with `args` in sys.argv."
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, proc, timeout=600):
    "Wait until `path` exists (the child reached its blocking point); fail with the child's output if it died."
    start = time.time()
    while not Path(path).exists():
        if proc.poll() is not None: pytest.fail(f"child exited with {proc.returncode}:\n{proc.stdout.read()}")
        if time.time() - start > timeout: proc.kill(); pytest.fail(f"child did not reach {path} in {timeout} s")
        time.sleep(0.05)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# A run whose `evaluate` stage blocks until the file argv[3] exists, after creating argv[2]: it holds the folder's lock.
BLOCKING_RUN = """
    import sys, time
    from pathlib import Path
    from safe_dual.toy import load_toy_world, exact_metrics
    from safe_dual.mocan import MoCAN
    out, ready, go = sys.argv[1:4]
    world = load_toy_world()
    def evaluator(model):
        Path(ready).touch()
        while not Path(go).exists(): time.sleep(0.05)
        return exact_metrics(model, world)
    MoCAN(world.new_model(), world.tokenizer, world.prompts, dict(reward=world.reward_scorer, safety=world.safety_scorers),
          (-0.25, -0.4), 1.0, n_samples=4, output_dir=out, max_new_tokens=world.max_new_tokens, batch_size=64,
          train_args=dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, max_steps=4,
                          per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True),
          evaluator=evaluator, bootstrap=0).run()
    print("finished")
"""

# A run of CHECKPOINTED training that blocks forever once its second checkpoint is saved (argv[2] then exists).
KILLED_IN_TRAINING = """
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import safe_dual.mocan as mocan
    from safe_dual.toy import load_toy_world, exact_metrics
    out, saved = sys.argv[1:3]
    class Blocker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                Path(saved).touch()
                while True: time.sleep(1)
    class Blocked(mocan.PseudoPreferenceTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(Blocker())
    mocan.PseudoPreferenceTrainer = Blocked
    world = load_toy_world()
    mocan.MoCAN(world.new_model(), world.tokenizer, world.prompts, dict(reward=world.reward_scorer, safety=world.safety_scorers),
                (-0.25, -0.4), 1.0, n_samples=4, output_dir=out, max_new_tokens=world.max_new_tokens, batch_size=64,
                train_args=dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, max_steps=6,
                                per_device_train_batch_size=8, save_strategy="steps", save_steps=2, disable_tqdm=True),
                evaluator=lambda model: exact_metrics(model, world), bootstrap=0).run()
"""


@pytest.fixture(scope="module")
def killed_in_training(tmp_path_factory):
    "A run folder whose run was SIGKILLed during `train`, right after saving checkpoint-4."
    base = tmp_path_factory.mktemp("killed")
    proc = child(KILLED_IN_TRAINING, base / "run", base / "saved")
    wait_for(base / "saved", proc)
    kill(proc)
    return base / "run"


# --- stage keys: what a rerun detects (report rows S1, S2) -------------------------------------------------------

def test_changed_policy_weights_resample(world, finished, tmp_path, caplog):
    "S1: the same folder with another policy (weights perturbed) resamples, and everything after collect is redone."
    folder, first = finished
    out = copy_of(folder, tmp_path)
    before = stamps(out)
    policy = world.new_model()
    with torch.no_grad():
        for p in policy.parameters(): p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    caplog.set_level(logging.INFO, logger="safe_dual")
    mo = mocan(world, out, policy=policy)
    again = mo.run()
    assert "[collect] settings changed (policy_weights): resampling" in messages(caplog)
    assert all(stamps(out)[s] != t for s, t in before.items())
    old = load_from_disk(folder / "collect" / "data")
    assert old["ref_logp"] != mo.collect()["ref_logp"]
    assert again["pi_ref"] != first["pi_ref"] and again["trained"] != first["trained"]


def test_changed_scorer_rescores(world, finished, tmp_path, caplog):
    "S2: another reward scorer rescores the samples (the column changes), and everything after collect is redone."
    folder, first = finished
    out = copy_of(folder, tmp_path)
    def doubled(prompts, responses): return 2 * world.reward_scorer(prompts, responses)
    caplog.set_level(logging.INFO, logger="safe_dual")
    mo = mocan(world, out, scorers=dict(reward=doubled, safety=world.safety_scorers))
    again = mo.run()
    assert "[collect] settings changed (scorers.reward): resampling" in messages(caplog)
    old = load_from_disk(folder / "collect" / "data")
    np.testing.assert_allclose(mo.collect()["reward"], 2 * np.asarray(old["reward"]), rtol=0, atol=1e-12)
    assert again["lam"] != first["lam"]


def test_changed_evaluator_reevaluates_only(world, finished, tmp_path, caplog):
    folder, first = finished
    out = copy_of(folder, tmp_path)
    before = stamps(out)
    def relabelled(model): return dict(exact_metrics(model, world), version=2)
    caplog.set_level(logging.INFO, logger="safe_dual")
    mocan(world, out, evaluator=relabelled).run()
    assert "[evaluate] settings changed (evaluator): recomputing" in messages(caplog)
    assert {s for s, t in stamps(out).items() if t != before[s]} == {"evaluate"}


def test_same_settings_reuse_everything(world, finished, tmp_path, caplog):
    folder, first = finished
    out = copy_of(folder, tmp_path)
    before = stamps(out)
    caplog.set_level(logging.INFO, logger="safe_dual")
    assert mocan(world, out).run() == first
    assert stamps(out) == before
    assert [m.split(" reused")[0] for m in messages(caplog)] == ["[collect]", "[dual]", "[label]", "[train]", "[evaluate]"]


def test_pecan_changed_policy_weights_prealign_again(world, tmp_path, caplog):
    "PeCAN's prealign keys hold the policy's weights: a perturbed policy re-trains the adapters."
    tiny = dict(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=32, logging_strategy="no",
                save_strategy="no", disable_tqdm=True, lora_r=4)
    sets = dict(helpful_data=toy_preferences(world, 48, "reward", seed=1), safety_data=toy_preferences(world, 48, 0, seed=2))
    evaluator = lambda model: (lambda e: dict(e, safety=e["safety"][:1]))(exact_metrics(model, world))
    pecan = lambda policy: PeCAN(policy, world.tokenizer, world.prompts, **sets, margins=0.05, beta=1.0, n_samples=3,
                                 output_dir=tmp_path, max_new_tokens=world.max_new_tokens, batch_size=32,
                                 prealign_args=tiny, train_args=tiny, evaluator=evaluator)
    pecan(world.new_model()).dual()
    before = stamps(tmp_path)
    policy = world.new_model()
    with torch.no_grad(): next(policy.parameters()).mul_(1.01)
    caplog.set_level(logging.INFO, logger="safe_dual")
    pecan(policy).dual()
    assert "[prealign/helpful] settings changed (policy_weights): recomputing" in messages(caplog)
    assert all(stamps(tmp_path)[s] != t for s, t in before.items())


# --- kills and partial writes ------------------------------------------------------------------------------------

def test_stale_checkpoint_after_new_thresholds(world, killed_in_training, tmp_path, caplog):
    "S4: a run killed during training and rerun with new thresholds trains from scratch, as a clean run would."
    out = copy_of(killed_in_training, tmp_path)
    assert (out / "train" / "checkpoints" / "checkpoint-4").exists() and not (out / "train" / "stage.json").exists()
    caplog.set_level(logging.INFO, logger="safe_dual")
    rerun = mocan(world, out, thresholds=NEW_THRESHOLDS, train_args=CHECKPOINTED)
    rerun.run()
    said = messages(caplog)
    assert "[train] partial work of other settings removed" in said
    assert not any("resuming" in m for m in said)
    clean = mocan(world, tmp_path / "clean", thresholds=NEW_THRESHOLDS, train_args=CHECKPOINTED)
    clean.run()
    got, expected = state_dict(rerun.model), state_dict(clean.model)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6


def test_incomplete_checkpoint_is_skipped(world, killed_in_training, tmp_path, caplog):
    "A killed run's newest checkpoint that lacks a file is skipped, with a warning, for the previous complete one."
    out = copy_of(killed_in_training, tmp_path)
    checkpoints = out / "train" / "checkpoints"
    assert checkpoint_problem(checkpoints / "checkpoint-4") is None
    (checkpoints / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    assert checkpoint_problem(checkpoints / "checkpoint-4") == "optimizer.pt truncated"
    caplog.set_level(logging.INFO, logger="safe_dual")
    mo = mocan(world, out, train_args=CHECKPOINTED)
    mo.run()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("safe_dual")]
    assert warnings == ["[train] checkpoint-4 is incomplete (optimizer.pt truncated): skipped and removed"]
    assert any(m.endswith("resuming from checkpoint-2") for m in messages(caplog))
    assert json.loads((out / "train" / "stage.json").read_text())["result"]["log"][-1]["step"] == 6


def test_checkpoint_problems(killed_in_training, tmp_path):
    out = copy_of(killed_in_training, tmp_path)
    ckpt = out / "train" / "checkpoints" / "checkpoint-2"
    for name, problem in [("rng_state.pth", "no rng_state.pth"), ("scheduler.pt", "no scheduler.pt"),
                          ("model.safetensors", "no model weights"), ("trainer_state.json", "no trainer_state.json")]:
        saved = (ckpt / name).read_bytes()
        (ckpt / name).unlink()
        assert checkpoint_problem(ckpt) == problem
        (ckpt / name).write_bytes(saved[: len(saved) // 2])
        assert checkpoint_problem(ckpt) == f"{name} truncated"
        (ckpt / name).write_bytes(saved)
    assert checkpoint_problem(ckpt) is None


@pytest.mark.parametrize("stage,text", [("dual", ""), ("collect", '{"key": "3f2a'), ("train", '{"key": "3f2a", "settings": {')])
def test_unreadable_stage_json_reruns_the_stage(world, finished, tmp_path, caplog, stage, text):
    "A 0-byte or half-written stage.json means 'not done': that stage (and what follows it) reruns, the run finishes."
    folder, first = finished
    out = copy_of(folder, tmp_path)
    (out / stage / "stage.json").write_text(text)
    caplog.set_level(logging.INFO, logger="safe_dual")
    again = mocan(world, out).run()
    assert any(m.startswith(f"[{stage}] stage.json unreadable: ") for m in messages(caplog))
    assert json.loads((out / stage / "stage.json").read_text())["key"]
    np.testing.assert_allclose(again["trained"]["safety"], first["trained"]["safety"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", ["collect", "label", "train"])
def test_missing_artifact_reruns_the_stage(world, finished, tmp_path, caplog, stage):
    folder, first = finished
    out = copy_of(folder, tmp_path)
    artifact = "model" if stage == "train" else "data"
    shutil.rmtree(out / stage / artifact)
    caplog.set_level(logging.INFO, logger="safe_dual")
    again = mocan(world, out).run()
    assert f"[{stage}] artifact `{artifact}` missing: {'retraining' if stage == 'train' else 'resampling' if stage == 'collect' else 'recomputing'}" in messages(caplog)
    assert (out / stage / artifact).exists()
    np.testing.assert_allclose(again["trained"]["safety"], first["trained"]["safety"], rtol=0, atol=1e-6)


def test_leftover_temporary_artifact_is_cleared(world, finished, tmp_path):
    "A kill while an artifact is written leaves only `.tmp-*` in the stage folder: the rerun removes it and finishes."
    folder, first = finished
    out = copy_of(folder, tmp_path)
    (out / "label" / "stage.json").unlink()
    os.replace(out / "label" / "data", out / "label" / ".tmp-data")
    again = mocan(world, out).run()
    assert not (out / "label" / ".tmp-data").exists() and (out / "label" / "data").exists()
    assert again["lam"] == first["lam"]


# --- one run per folder ------------------------------------------------------------------------------------------

def test_second_concurrent_run_fails_at_once_naming_the_holder(world, tmp_path):
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    proc = child(BLOCKING_RUN, out, ready, go)
    try:
        wait_for(ready, proc)
        start = time.time()
        with pytest.raises(RunFolderBusyError) as e: mocan(world, out).run()
        assert time.time() - start < 30  # at once, not after the holder (which waits for `go`) ends; 30 s allows a loaded machine
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(e.value) and str(out) in str(e.value)
        go.touch()
        assert proc.wait(timeout=600) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None: proc.kill()


def test_lock_of_a_killed_run_is_taken_over(world, tmp_path):
    out, ready = tmp_path / "run", tmp_path / "ready"
    proc = child(BLOCKING_RUN, out, ready, tmp_path / "never")
    wait_for(ready, proc)
    kill(proc)
    result = mocan(world, out).run()
    assert json.loads((out / ".lock.json").read_text())["pid"] == os.getpid()
    assert result["trained"]["kl"] > 0 and (out / "evaluate" / "stage.json").exists()


# --- bad settings refused at construction ------------------------------------------------------------------------

@pytest.mark.parametrize("output_dir", ["", "  ", None, "a file"])
def test_bad_output_dir(world, tmp_path, monkeypatch, output_dir):
    monkeypatch.chdir(tmp_path)
    if output_dir == "a file": Path(output_dir).write_text("not a folder")
    with pytest.raises(ValueError, match="`output_dir`"): mocan(world, output_dir)
    assert [p.name for p in tmp_path.iterdir()] == ([] if output_dir != "a file" else ["a file"])


def test_train_args_checked_at_construction(world, tmp_path):
    with pytest.raises(ValueError, match="unknown setting `lerning_rate`; did you mean `learning_rate`"):
        mocan(world, tmp_path, train_args=dict(TINY, lerning_rate=1e-3))
    with pytest.raises(ValueError, match="`loss_type`.*'listwize'"):
        mocan(world, tmp_path, train_args=dict(TINY, loss_type="listwize"))
    with pytest.raises(ValueError, match="`learning_rate` must be > 0"):
        mocan(world, tmp_path, train_args=dict(TINY, learning_rate=-1e-3))
    with pytest.raises(ValueError, match="`prealign_args`: unknown setting `lora_alpah`; did you mean `lora_alpha`"):
        PeCAN(world.new_model(), world.tokenizer, world.prompts, toy_preferences(world, 8, "reward", seed=1),
              toy_preferences(world, 8, 0, seed=2), margins=0.1, beta=1.0, output_dir=tmp_path, prealign_args=dict(lora_alpah=4))
    assert list(tmp_path.iterdir()) == []


def test_unconverged_dual_stops_the_run(world, tmp_path, monkeypatch):
    "A dual that did not converge stops MoCAN before `label`: nothing is trained on an unconverged lam."
    monkeypatch.setattr(safe_dual.mocan, "solve_dual", lambda *args, **kwargs: solve_dual(*args, **dict(kwargs, max_iter=1)))
    with pytest.warns(RuntimeWarning, match="did not converge"), pytest.raises(DualNotConvergedError, match="MoCAN stops"):
        mocan(world, tmp_path).run()
    assert (tmp_path / "collect" / "stage.json").exists()
    assert not any((tmp_path / s).exists() for s in ("dual", "label", "train", "evaluate"))


LAUNCHED_RUN = """
    import os, sys
    from safe_dual.toy import load_toy_world, exact_metrics
    from safe_dual.mocan import MoCAN
    world = load_toy_world()
    result = MoCAN(world.new_model(), world.tokenizer, world.prompts, dict(reward=world.reward_scorer, safety=world.safety_scorers),
                   (-0.25, -0.4), 1.0, n_samples=4, output_dir=sys.argv[1], max_new_tokens=world.max_new_tokens, batch_size=64,
                   train_args=dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, max_steps=4,
                                   per_device_train_batch_size=4, save_strategy="steps", save_steps=2, disable_tqdm=True),
                   evaluator=lambda model: exact_metrics(model, world), bootstrap=0).run()
    print(f"RESULT {os.environ['RANK']} {result['lam']} {result['trained']['kl']} END", flush=True)
"""


def test_launched_job_is_one_run(tmp_path):
    "Two processes under torchrun (as `accelerate launch` starts them) share the folder: one lock, one writer, one result."
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(LAUNCHED_RUN))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "run")],
                          env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the two processes share stdout, so their lines can interleave: read each report between its markers
    results = sorted(list(m) for m in re.findall(r"RESULT (\d) (.*?) END", proc.stdout))
    assert [r[0] for r in results] == ["0", "1"] and results[0][1] == results[1][1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", ".lock.json", "collect", "dual", "evaluate", "label", "train"]
    assert not list((tmp_path / "run").rglob(".tmp-*"))
