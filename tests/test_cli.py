"""`safe-dual` end to end: example configs check, every bad config is refused before any work with a message naming the
key, a MoCAN config with models loaded from local paths runs, and no command leaves process-wide settings changed."""
import json, logging, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification
from safe_dual.cli import build_pipeline, check_config, load_config, main
from safe_dual.toy import load_toy_world

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOY = dict(world="toy", thresholds=[-0.25, -0.4], beta=1.0)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_check(name, tmp_path, monkeypatch):
    "Every example config passes the whole check; the toy ones build their pipeline."
    cfg = dict(load_config(EXAMPLES / name), output_dir=str(tmp_path / "run"))
    kind = "mocan" if name.startswith("mocan") else "pecan"
    if name == "mocan_smollm2.yaml":  # its prompts and score models are written first by `python -m safe_dual.smollm2`
        work = tmp_path / "work"
        for d in ("runs/smollm2/reward", "runs/smollm2/cost"): (work / d).mkdir(parents=True)
        for f in ("train_prompts.txt", "eval_prompts.txt"): (work / "runs/smollm2" / f).write_text("a prompt\n")
        monkeypatch.chdir(work)
    checked = check_config(cfg, kind, source=name)
    assert checked.beta == cfg["beta"]
    if cfg.get("world") == "toy":
        assert build_pipeline(cfg, kind).beta == cfg["beta"]
    assert not (tmp_path / "run").exists()  # checking and building write nothing


def _error(tmp_path, capsys, config, kind="mocan", suffix=".yaml"):
    "The one error line `safe-dual KIND --config FILE` prints for `config` (a mapping, or the file's text)."
    path = tmp_path / f"run{suffix}"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as stop: main([kind, "--config", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"safe-dual {kind}: error: {path}") and err.count("error:") == 1, err
    return err


def _a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    return str(tmp_path / "a_file")


# (report row, config or file text, message the error must contain); each is refused before any model is loaded
BAD_CONFIGS = [
    ("C3", "world: toy\nthresholds: [-0.25, -0.4\nbeta: 1.0\n", ":3:5: invalid YAML"),
    ("C5", '{"world": "toy", "beta": 1.0,}', ":1:30: invalid JSON: Expecting property name"),
    ("C8", dict(TOY, n_sample=8), "unknown setting `n_sample`; did you mean `n_samples`?"),
    ("C9", dict(TOY, beta="abc"), "`beta` must be a number; got 'abc'"),
    ("C11b", dict(TOY, n_samples="8x"), "`n_samples` must be an integer; got '8x'"),
    ("C16", dict(TOY, train=dict(learning_rate=-1e-3)), "`train.learning_rate` must be > 0; got -0.001"),
    ("C18", dict(TOY, train=dict(lerning_rate=1e-3)), "unknown setting `train.lerning_rate`; did you mean `train.learning_rate`?"),
    ("C20", dict(TOY, train=dict(num_train_epochs=0)), "`train.num_train_epochs` must be > 0 (0 epochs would train nothing)"),
    ("C20b", dict(TOY, train=dict(max_steps=0)), "`train.max_steps` must be != 0"),
    ("V1", dict(TOY, validation=1.0), "`validation` must be < 1"),
    ("V2", dict(TOY, validation=0.2, train=dict(save_strategy="no")), "`validation` keeps the best checkpoint"),
    ("T10", dict(TOY, train=dict(per_device_train_batch_size=0)), "`train.per_device_train_batch_size` must be >= 1; got 0"),
    ("C21", dict(thresholds=0.0, beta=0.1, policy="/nonexistent/model", prompts=["a"],
                 scorers=dict(reward=dict(model="org/rm"), safety=dict(model="org/cm", negate=True))),
     "`policy` '/nonexistent/model': no such file or folder"),
    ("C22", dict(thresholds=0.0, beta=0.1, policy="./missing_model", prompts=["a"],
                 scorers=dict(reward=dict(model="org/rm"), safety=dict(model="org/cm", negate=True))),
     "`policy` './missing_model': no such file or folder"),
    ("C23", dict(thresholds=0.0, beta=0.1, policy="org/m", prompts="missing.txt",
                 scorers=dict(reward=dict(model="org/rm"), safety=dict(model="org/cm", negate=True))),
     "`prompts` 'missing.txt': no such file or folder"),
    ("scorer path", dict(thresholds=0.0, beta=0.1, policy="org/m", prompts=["a"],
                         scorers=dict(reward=dict(model="./rm"), safety=[dict(model="org/cm", negate=True)])),
     "`scorers.reward.model` './rm': no such file or folder"),
    ("preferences path", (dict(margins=0.1, beta=0.1, policy="org/m", prompts=["a"],
                               preferences=dict(helpful="org/h", safety=["./missing_prefs"])), "pecan"),
     "`preferences.safety[0]` './missing_prefs': no such file or folder"),
    ("C25", lambda tmp: dict(TOY, output_dir=_a_file(tmp)), "is a file; give a folder"),
    ("C26", dict(TOY, output_dir="/proc/forbidden"), "`output_dir` '/proc/forbidden' cannot be created or written"),
    ("C27", dict(thresholds=0.0, beta=0.1, policy="org/m", prompts=["a"], torch_dtype="float33",
                 scorers=dict(reward=dict(model="org/rm"), safety=dict(model="org/cm", negate=True))),
     "`torch_dtype` must be one of 'float32', 'bfloat16', 'float16', 'float64', 'auto'; got 'float33' (did you mean 'float32'?)"),
    ("C33", dict(TOY, output_dir=""), "`output_dir` is empty"),
    ("C34", dict(TOY, output_dir=None), "`output_dir` must be a folder name; got None"),
    ("toy unused", dict(TOY, policy="gpt2"), "`policy` is not used with `world: toy`"),
    ("needs data", dict(thresholds=0.0, beta=0.1, policy="org/m", prompts=["a"]), "the config needs `scorers`"),
    ("thresholds", dict(TOY, thresholds=[0.0, 0.0, 0.0]), "`thresholds` has 3 values but there are 2 safety scores"),
    ("train.beta", dict(TOY, train=dict(beta=0.5)), "`train.beta` is set by the pipeline; use the top-level `beta`"),
    ("train enum", dict(TOY, train=dict(lr_scheduler_type="cosinus")), "`train`: cosinus is not a valid SchedulerType"),
    ("required", dict(world="toy", beta=1.0), "`thresholds` is required"),
    ("pecan key in mocan", dict(TOY, margins=0.1), "`margins` is a `safe-dual pecan` setting"),
    ("bootstrap in pecan", (dict(world="toy", margins=0.1, beta=1.0, bootstrap=0), "pecan"), "`bootstrap` is a `safe-dual mocan` setting"),
    ("labels", dict(TOY, labels="sofft"), "`labels` must be one of 'soft', 'sampled', 'hard'; got 'sofft' (did you mean 'soft'?)"),
]


@pytest.mark.parametrize("row, config, message", BAD_CONFIGS, ids=[r[0] for r in BAD_CONFIGS])
def test_bad_config_refused_before_any_work(row, config, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config(tmp_path) if callable(config) else config
    config, kind = config if isinstance(config, tuple) else (config, "mocan")
    suffix = ".json" if row == "C5" else ".yaml"
    before = set(tmp_path.iterdir())
    err = _error(tmp_path, capsys, config, kind, suffix)
    assert message in err, err
    assert set(tmp_path.iterdir()) - before == {tmp_path / f"run{suffix}"}  # nothing was written


def test_many_problems_reported_at_once(tmp_path, capsys):
    err = _error(tmp_path, capsys, dict(TOY, beta="abc", n_sample=8, train=dict(lerning_rate=1e-3)))
    assert "3 problems:" in err and "`beta`" in err and "`n_sample`" in err and "`train.lerning_rate`" in err, err


def test_yaml_numbers_read_as_strings_are_coerced(tmp_path):
    "YAML 1.1 reads 3e-3 as a string (C19) and a quoted '8' is one (C11): both become the numbers meant."
    path = tmp_path / "run.yaml"
    path.write_text("world: toy\nthresholds: [-0.25, -0.4]\nbeta: 1\nn_samples: '8'\ntrain: {learning_rate: 3e-3}\n")
    cfg = check_config(load_config(path), "mocan")
    assert (cfg.n_samples, cfg.train["learning_rate"], cfg.beta) == (8, 0.003, 1.0)


def test_every_key_is_used(tmp_path):
    "`bootstrap` (C29) and `validation` reach MoCAN; the toy world's exact evaluation and prompts are used."
    pipe = build_pipeline(dict(TOY, output_dir=str(tmp_path / "run"), bootstrap=0, n_samples=8, seed=3, validation=0.25), "mocan")
    assert (pipe.bootstrap, pipe.sampling["n"], pipe.seed, pipe.validation) == (0, 8, 3, 0.25)
    np.testing.assert_allclose(pipe.tolerance, [0.0272, 0.0405], atol=1e-4)  # toy world: 5% of each score's spread
    pecan = build_pipeline(dict(world="toy", margins=0.1, beta=1.0, holdout=0.2, tolerance=0.01, n_pairs=64,
                                output_dir=str(tmp_path / "pecan")), "pecan")
    assert pecan.holdout == 0.2 and pecan.tolerance.tolist() == [0.01, 0.01]


def test_hub_errors_are_one_line(tmp_path, capsys, monkeypatch):
    "A hub id that cannot be loaded (offline) and a missing folder that looks like a hub id (C24): one error line each."
    import datasets, huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    w = load_toy_world()
    w.new_model().save_pretrained(tmp_path / "policy")
    w.tokenizer.save_pretrained(tmp_path / "policy")
    scorers = dict(reward=dict(model="org/rm"), safety=dict(model="org/cm", negate=True))
    cases = [(dict(policy="someorg/somemodel", prompts=["a"]), "`policy` 'someorg/somemodel' is not a local path"),
             (dict(policy=str(tmp_path / "policy"), prompts="data/missing_folder"), "`prompts` 'data/missing_folder' is not a local path")]
    for paths, message in cases:
        err = _error(tmp_path, capsys, dict(paths, thresholds=0.0, beta=0.1, scorers=scorers, output_dir=str(tmp_path / "out")))
        assert len(err.strip().splitlines()) == 1 and message in err and "HF_HUB_OFFLINE=1" in err, err


def test_dual_data_missing(capsys):
    "C44: `--data` that does not exist is named."
    with pytest.raises(SystemExit): main(["dual", "--data", "/nonexistent"])
    assert "`--data` /nonexistent is not a folder" in capsys.readouterr().err


def _score_model(path, seed):
    torch.manual_seed(seed)
    w = load_toy_world()
    cfg = LlamaConfig(vocab_size=len(w.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=w.tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    w.tokenizer.save_pretrained(path)


def _policy(path, noise=0.0):
    "The toy policy with its tokenizer saved in `path`, its weights perturbed by `noise` (seeded)."
    w = load_toy_world()
    model = w.new_model()
    with torch.no_grad():
        for p in model.parameters(): p.add_(noise * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(path)
    w.tokenizer.save_pretrained(path)


def _local_config(tmp_path):
    "A MoCAN config whose policy, reward and cost models and prompts are local files, and its file."
    w = load_toy_world()
    _policy(tmp_path / "policy")
    _score_model(tmp_path / "reward", 0)
    _score_model(tmp_path / "cost", 1)
    (tmp_path / "prompts.txt").write_text("\n".join(w.prompts[:6]))
    cfg = dict(output_dir=str(tmp_path / "run"), policy=str(tmp_path / "policy"), prompts=str(tmp_path / "prompts.txt"),
               scorers=dict(reward=dict(model=str(tmp_path / "reward")), safety=dict(model=str(tmp_path / "cost"), negate=True)),
               thresholds=None, beta=1.0, n_samples=4, max_new_tokens=w.max_new_tokens, batch_size=8, n_eval=2,
               train=dict(max_steps=2, per_device_train_batch_size=4))
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    return cfg


def test_mocan_config_with_models_from_local_paths(tmp_path, capsys):
    "The user path: policy, reward and cost models through `from_pretrained` on local folders, prompts from a .txt file."
    _local_config(tmp_path)
    main(["mocan", "--config", str(tmp_path / "run.json")])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"unconstrained run (no constraint to meet); results saved in {tmp_path / 'run'}"
    result = json.loads((tmp_path / "run" / "evaluate" / "stage.json").read_text())["result"]
    assert set(result["win_rate"]) == {"reward", "safety"}
    assert 0 <= result["win_rate"]["reward"] <= 1
    assert np.isfinite(result["trained"]["kl"])
    assert (tmp_path / "run" / "train" / "model" / "adapter_model.safetensors").exists()


def test_changed_model_folders_redo_collect(tmp_path, capsys):
    "S1, S2: the same output_dir with another reward model folder rescores, and with another policy folder resamples."
    from datasets import load_from_disk
    cfg = _local_config(tmp_path)
    def run(**changes):
        (tmp_path / "run.json").write_text(json.dumps(dict(cfg, **changes)))
        capsys.readouterr()
        main(["mocan", "--config", str(tmp_path / "run.json")])
        return capsys.readouterr().err, np.asarray(load_from_disk(tmp_path / "run" / "collect" / "data")["reward"])
    _, first = run()
    _score_model(tmp_path / "reward_b", 2)
    err, rescored = run(scorers=dict(cfg["scorers"], reward=dict(model=str(tmp_path / "reward_b"))))
    assert "[collect] settings changed (scorers.reward): resampling" in err, err
    assert np.abs(rescored - first).max() > 1e-3  # the new model's scores, not the old ones
    _policy(tmp_path / "policy_b", noise=0.05)
    err, _ = run(scorers=dict(cfg["scorers"], reward=dict(model=str(tmp_path / "reward_b"))), policy=str(tmp_path / "policy_b"))
    assert "[collect] settings changed (policy_weights): resampling" in err, err


def _process_state():
    "What a command may change only for its own duration."
    import datasets, transformers
    log = logging.getLogger("safe_dual")
    return (torch.get_num_threads(), log.level, list(log.handlers), log.propagate, logging.getLogger("transformers").level,
            transformers.utils.logging.is_progress_bar_enabled(), datasets.utils.are_progress_bars_disabled())


@pytest.mark.parametrize("flags", [[], ["--quiet"], ["--verbose"]])
def test_commands_restore_process_state(flags, tmp_path, capsys):
    "Threads, the `safe_dual` logger and third-party verbosity are what they were, after a toy run and a dual."
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        before = _process_state()
        cfg = dict(TOY, output_dir=str(tmp_path / "run"), n_samples=4, batch_size=32,
                   train=dict(loss_type="listwise", use_lora=False, max_steps=2, per_device_train_batch_size=8))
        (tmp_path / "run.json").write_text(json.dumps(cfg))
        main(["mocan", *flags, "--config", str(tmp_path / "run.json")])
        assert _process_state() == before
        main(["dual", "--example", *flags, "--threshold", "-0.3,-0.5"])
        assert _process_state() == before
    finally: torch.set_num_threads(old)
    captured = capsys.readouterr()
    assert "b=-0.3,-0.5" in captured.out
    if flags == ["--quiet"]: assert captured.err == ""
    else: assert "[collect]" in captured.err or "[train]" in captured.err, captured.err


def test_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "safe_dual.cli", "dual", "--example", "--threshold", "-0.3,-0.5"],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pi_ref" in out.stdout and "b=-0.3,-0.5" in out.stdout


def test_policy_temperature_makes_pi_ref_the_tempered_policy(tmp_path, capsys):
    "`policy_temperature: 0.5`: the pipeline's pi_ref has the loaded policy's logits / 0.5, and changing it resamples."
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    cfg = _local_config(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")(ids).logits
        pipe = build_pipeline(dict(cfg, policy_temperature=0.5), "mocan")
        torch.testing.assert_close(pipe.policy(ids).logits, plain / 0.5, rtol=1e-5, atol=1e-5)
    main(["mocan", "--config", str(tmp_path / "run.json")])
    first = load_from_disk(tmp_path / "run" / "collect" / "data")["ref_logp"]
    (tmp_path / "run.json").write_text(json.dumps(dict(cfg, policy_temperature=0.5)))
    capsys.readouterr()
    main(["mocan", "--config", str(tmp_path / "run.json")])
    assert "[collect] settings changed (policy_weights): resampling" in capsys.readouterr().err
    assert load_from_disk(tmp_path / "run" / "collect" / "data")["ref_logp"] != first
    for bad in (0, -1):
        (tmp_path / "bad.json").write_text(json.dumps(dict(cfg, policy_temperature=bad)))
        with pytest.raises(SystemExit): main(["mocan", "--config", str(tmp_path / "bad.json")])
        assert "`policy_temperature`" in capsys.readouterr().err
