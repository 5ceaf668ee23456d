"`safe-dual` end to end: example configs parse, and a MoCAN config with models loaded from local paths runs."
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification
from safe_dual.cli import load_config, build_pipeline, main
from safe_dual.toy import load_toy_world

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_configs_parse(name):
    cfg = load_config(EXAMPLES / name)
    kind = "mocan" if name.startswith("mocan") else "pecan"
    assert "beta" in cfg and ("thresholds" in cfg if kind == "mocan" else "margins" in cfg)
    if cfg.get("world") == "toy":
        pipe = build_pipeline(dict(cfg, output_dir="unused"), kind)
        assert pipe.beta == cfg["beta"]
    else:
        assert {"policy", "prompts"} <= set(cfg)


def _score_model(path, seed):
    torch.manual_seed(seed)
    w = load_toy_world()
    cfg = LlamaConfig(vocab_size=len(w.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=w.tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    w.tokenizer.save_pretrained(path)


def test_mocan_config_with_models_from_local_paths(tmp_path):
    "The user path: policy, reward and cost models through `from_pretrained` on local folders, prompts from a .txt file."
    w = load_toy_world()
    w.new_model().save_pretrained(tmp_path / "policy")
    w.tokenizer.save_pretrained(tmp_path / "policy")
    _score_model(tmp_path / "reward", 0)
    _score_model(tmp_path / "cost", 1)
    (tmp_path / "prompts.txt").write_text("\n".join(w.prompts[:6]))
    cfg = dict(output_dir=str(tmp_path / "run"), policy=str(tmp_path / "policy"), prompts=str(tmp_path / "prompts.txt"),
               scorers=dict(reward=dict(model=str(tmp_path / "reward")), safety=dict(model=str(tmp_path / "cost"), negate=True)),
               thresholds=None, beta=1.0, n_samples=4, max_new_tokens=w.max_new_tokens, batch_size=8, n_eval=2,
               train=dict(max_steps=2, per_device_train_batch_size=4, disable_tqdm=True))
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    main(["mocan", "--config", str(tmp_path / "run.json")])
    result = json.loads((tmp_path / "run" / "evaluate" / "stage.json").read_text())["result"]
    assert set(result["win_rate"]) == {"reward", "safety"}
    assert 0 <= result["win_rate"]["reward"] <= 1
    assert np.isfinite(result["trained"]["kl"])
    assert (tmp_path / "run" / "train" / "model" / "adapter_model.safetensors").exists()


def test_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "safe_dual.cli", "dual", "--example", "--threshold=-0.3,-0.5"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pi_ref" in out.stdout and "b=-0.3,-0.5" in out.stdout
