"""MoCAN and PeCAN as launched jobs on CPU (gloo): two processes started by `accelerate launch` with the shipped DDP config
give the one-process results, a two-process torchrun job killed during training resumes to the same end, and the
command line runs under `accelerate launch` as the README says.

What makes the runs comparable: both sample with the same seeds and batches (`sample_responses` shards do not depend
on the number of processes), so the scores, lam* and the labels are identical; training keeps the global batch equal
(per-device batch 8 on one process, 4 on each of two) over datasets whose size the global batch divides, and the
Trainer's seeded sampler orders the data the same way for both. What still differs is the order of float sums (DDP
averages two half-batch gradients), so the exact toy metrics of the trained policies agree to 1e-5, not bit for bit."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOL = 1e-5  # exact toy metrics of the trained policies, one process against two

# Runs MoCAN (and, with `all`, a MoCAN evaluated by sampling and PeCAN) on the toy world with a global training batch of 8, exact evaluation, and
# writes one report file per process (`reports`). `block` makes training stop for good after checkpoint-4, once it is saved.
SCRIPT = """
    import json, logging, os, sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import safe_dual.mocan as mocan
    from safe_dual.runs import weights_digest
    from safe_dual.pecan import PeCAN
    from safe_dual.toy import load_toy_world, exact_metrics, toy_preferences
    out, what = Path(sys.argv[1]), sys.argv[2:]
    logging.basicConfig(format="%(message)s")
    logging.getLogger("safe_dual").setLevel(logging.INFO)
    rank, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if "block" in what:
        class Blocker(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == 4:
                    (out.parent / f"saved-{rank}").write_text(str(os.getpid()))
                    while True: time.sleep(1)
        class Blocked(mocan.PseudoPreferenceTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Blocker())
        mocan.PseudoPreferenceTrainer = Blocked
    world = load_toy_world()
    exact = lambda model: exact_metrics(model, world)
    # sampling batches of 4: 24 (MoCAN) or 18 (PeCAN) batches, two shards of up to 16 batches, one per process.
    # 24 prompts, one list each: 3 steps of 8 lists an epoch, checkpoints at steps 2, 4 and 6
    tiny = dict(loss_type="listwise", learning_rate=3e-3, max_steps=6, per_device_train_batch_size=8 // processes,
                save_strategy="steps", save_steps=2, disable_tqdm=True)
    results, start = {}, time.time()
    mo = mocan.MoCAN(world.new_model(), world.tokenizer, world.prompts, dict(reward=world.reward_scorer, safety=world.safety_scorers),
                     (-0.25, -0.4), 1.0, n_samples=4, output_dir=out / "mocan", max_new_tokens=world.max_new_tokens,
                     batch_size=4, train_args=dict(tiny, use_lora=False), evaluator=exact, bootstrap=0)
    results["mocan"] = dict(mo.run(), digest=weights_digest(mo.model), seconds=time.time() - start)
    if "all" in what:
        start = time.time()
        # LoRA, evaluated by sampling: both policies' samples split by shard, scored and their KL read per shard
        sampled = mocan.MoCAN(world.new_model(), world.tokenizer, world.prompts, dict(reward=world.reward_scorer,
                              safety=world.safety_scorers), (-0.25, -0.4), 1.0, n_samples=4, output_dir=out / "sampled",
                              max_new_tokens=world.max_new_tokens, batch_size=4, n_eval=4, bootstrap=0,
                              train_args=dict(tiny, max_steps=3, save_strategy="no", lora_r=4))
        results["sampled"] = dict(sampled.run(), digest=weights_digest(sampled.model), seconds=time.time() - start)
        start = time.time()
        # 80 pairs, 16 held out: 2 steps of 32 pairs an epoch
        prealign = dict(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=32 // processes,
                        save_strategy="no", disable_tqdm=True, lora_r=4)
        pe = PeCAN(world.new_model(), world.tokenizer, world.prompts, toy_preferences(world, 80, "reward", seed=1),
                   toy_preferences(world, 80, 0, seed=2), margins=0.05, beta=1.0, n_samples=3, output_dir=out / "pecan",
                   max_new_tokens=world.max_new_tokens, batch_size=4, holdout=0.2, prealign_args=prealign,
                   train_args=dict(tiny, max_steps=3, save_strategy="no", lora_r=4),
                   evaluator=lambda model: (lambda e: dict(e, safety=e["safety"][:1]))(exact(model)))
        results["pecan"] = dict(pe.run(), digest=weights_digest(pe.model), seconds=time.time() - start)
    # each process writes its report to a file of its own: two processes' stdout can share a line (and a long line can be
    # split by the other's output), so the report is not parsed from the output
    report = out.parent / f"{out.name}-result-{rank}.json"
    report.with_suffix(".tmp").write_text(json.dumps(dict(rank=rank, processes=processes, results=results)))
    report.with_suffix(".tmp").replace(report)
"""


def launch(command, tmp_path, *args, **kwargs):
    "Start `command` (a launcher, or none) on the script with `args`, in the repository root."
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return subprocess.Popen([*command, str(script), *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port():
    "A port no one listens on now, so that jobs of tests running side by side do not meet on torchrun's default."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(): return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]


def accelerate():
    "The shipped 8-GPU DDP config on 2 CPU processes: its launcher is torchrun's, which falls back to gloo without GPUs."
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "examples/accelerate/ddp_8gpu.yaml",
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]


def reports(folder:Path)->dict:
    "The reports that the launched script's processes wrote for the run folder `folder`, by rank."
    found = [json.loads(p.read_text()) for p in sorted(folder.parent.glob(f"{folder.name}-result-*.json"))]
    return {r["rank"]: r for r in found}


def results_of(proc, folder:Path|None=None, timeout=900):
    "Wait for `proc`; its output and the reports of each process for the run folder `folder`, by rank. A job that hangs is killed, workers first."
    try: out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]: p.kill()
        pytest.fail(f"the job did not finish in {timeout} s:\n{proc.communicate()[0][-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out, reports(folder) if folder is not None else {}


def close(a, b, tol, path=""):
    "Nested results `a` and `b` agree: numbers to `tol`, everything else exactly."
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a: close(a[k], b[k], tol, f"{path}.{k}")
    elif isinstance(a, list) and a and isinstance(a[0], (int, float)) and not isinstance(a[0], bool):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=path)
    elif isinstance(a, float): np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=path)
    else: assert a == b, path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The same MoCAN (exact and sampled evaluation) and PeCAN runs in one process and as a two-process `accelerate launch` job."
    base = tmp_path_factory.mktemp("dist")
    one = results_of(launch([sys.executable], base, base / "one", "all"), base / "one")[1][0]
    two = results_of(launch(accelerate(), base, base / "two", "all"), base / "two")[1]
    return dict(one=one, two=two, folder=base / "two")


def test_two_processes_equal_one(runs):
    "MoCAN's lam* is the same number; the rest agrees to `TOL`; both processes hold one result, that of process 0."
    one, two = runs["one"], runs["two"]
    assert sorted(two) == [0, 1] and all(r["processes"] == 2 for r in two.values())
    for name in ("mocan", "sampled", "pecan"):
        first, second = (dict(two[r]["results"][name]) for r in (0, 1))
        assert first.pop("seconds") and second.pop("seconds")
        assert first == second, name                       # rank 1 reads rank 0's result; DDP kept equal weights
        single = {k: v for k, v in one["results"][name].items() if k not in ("seconds", "digest")}
        first.pop("digest")
        if name != "pecan": np.testing.assert_array_equal(first["lam"], single["lam"])  # same scores, same dual
        close(first, single, TOL, name)  # PeCAN's lam* reads the implicit rewards of adapters trained under DDP


def test_each_process_writes_its_own_shards(runs):
    "Two sample shards (one a process), each scored into its own shard; no temporary file left, one stage.json a stage."
    folder = runs["folder"] / "mocan"
    shards = sorted(p.name for p in (folder / "collect" / "scored").glob("shard-*"))
    assert shards == sorted(p.name for p in (folder / "collect" / "samples").glob("shard-*")) and len(shards) >= 2
    assert not list(folder.rglob(".tmp-*")) and not list(folder.rglob(".*.tmp"))
    assert sorted(p.parent.name for p in folder.glob("*/stage.json")) == ["collect", "dual", "evaluate", "label", "train"]
    for policy in ("trained", "pi_ref"):
        evaluated = runs["folder"] / "sampled" / "evaluate" / "samples" / policy
        assert len(list((evaluated / "scored").glob("shard-*"))) == len(list((evaluated / "samples").glob("shard-*"))) == 2


def test_killed_job_resumes(runs, tmp_path):
    "SIGKILL both processes of a torchrun job after checkpoint-4; the relaunched job resumes from it and ends as the uninterrupted one."
    proc = launch(torchrun(), tmp_path, tmp_path / "run", "block")
    deadline = time.time() + 900
    while not all((tmp_path / f"saved-{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-6000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the pid is written before the blocking loop
    for r in (0, 1): os.kill(int((tmp_path / f"saved-{r}").read_text()), signal.SIGKILL)
    proc.communicate(timeout=600)
    assert proc.returncode != 0
    train = tmp_path / "run" / "mocan" / "train"
    assert (train / "checkpoints" / "checkpoint-4").exists() and not (train / "stage.json").exists()
    out, resumed = results_of(launch(torchrun(), tmp_path, tmp_path / "run"), tmp_path / "run")
    # counted in the whole output, not per line: the processes' lines and progress bars can share a line
    assert out.count("resuming from checkpoint-4") == 2, out[-6000:]
    assert out.count("[dual] reused") == 2, out[-6000:]
    got = {k: v for k, v in resumed[0]["results"]["mocan"].items() if k != "seconds"}
    expected = {k: v for k, v in runs["two"][0]["results"]["mocan"].items() if k != "seconds"}
    close(got, expected, TOL)


CLI_CONFIG = """
world: toy
thresholds: [-0.25, -0.4]
beta: 1.0
n_samples: 4
batch_size: 4
train: {loss_type: listwise, use_lora: false, learning_rate: 3.0e-3, max_steps: 3, per_device_train_batch_size: 4, save_strategy: "no"}
"""


def test_command_line_under_accelerate(tmp_path):
    "The README's launch line, on the toy world: `accelerate launch --config_file ... -m safe_dual.cli mocan` runs as one job."
    config = tmp_path / "toy.yaml"
    config.write_text(CLI_CONFIG + f"output_dir: {tmp_path / 'run'}\n")
    proc = subprocess.Popen([*accelerate(), "-m", "safe_dual.cli", "mocan", "--config", str(config)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = results_of(proc)[0]
    assert "results saved in" in out, out[-6000:]
    assert len(list((tmp_path / "run" / "collect" / "samples").glob("shard-*"))) == 2  # 24 batches: one shard a process
    assert sorted(p.parent.name for p in (tmp_path / "run").glob("*/stage.json")) == ["collect", "dual", "evaluate", "label", "train"]
