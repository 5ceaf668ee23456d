"""Integration and property tests for `safe_dual.sampling`: two-process sampling with accelerate, a killed and
resumed sampling run, and invariances of `sequence_logprobs` and `to_dual_inputs`."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safe_dual.scoring import CallableScorer, score, to_dual_inputs
from safe_dual.sampling import load_samples, sample_responses, sequence_logprobs
from safe_dual.console import quiet_third_party
from safe_dual.scoring import scorer_digest
from safe_dual.runs import tokenizer_digest, weights_digest

WORDS = "[PAD] [EOS] [UNK] a b c d e f g h i j k l m n o p".split()
PROMPTS = ["a b c", "d", "e f g h i", "j k"]
SETTINGS = dict(n=3, max_new_tokens=6, batch_size=2, seed=0, batches_per_shard=1, progress=False)
TESTS = Path(__file__).resolve().parent


def tiny_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def assert_same_samples(got, expected):
    "Same rows, token ids, texts and flags exactly; log-probs to 1e-6 (what 07_sampling promises for a resumed run)."
    assert set(got) == set(expected)
    for col in expected:
        if col == "ref_logp": np.testing.assert_allclose(got[col], expected[col], rtol=0, atol=1e-6)
        else: assert got[col] == expected[col], col


@pytest.fixture(scope="module")
def reference():
    "The one-process, in-memory run every sharded run must reproduce."
    return sample_responses(tiny_lm(), tiny_tokenizer(), PROMPTS, **SETTINGS).to_dict()


def _run(script, *args, **kwargs):
    return subprocess.Popen([*script, *map(str, args)], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(TESTS)}, **kwargs)


SAMPLE_SCRIPT = """
import json, sys, time
from accelerate import PartialState
from test_data import tiny_lm, tiny_tokenizer, PROMPTS, SETTINGS
from safe_dual.sampling import sample_responses
model, delay = tiny_lm(), float(sys.argv[2])
generate = model.generate
def slow_generate(*args, **kwargs):
    time.sleep(delay)
    return generate(*args, **kwargs)
model.generate = slow_generate
ds = sample_responses(model, tiny_tokenizer(), PROMPTS, output_dir=sys.argv[1], **SETTINGS)
state = PartialState()
print(json.dumps({"process": state.process_index, "processes": state.num_processes, "rows": len(ds)}))
"""


def test_two_processes_equal_one(tmp_path, reference):
    "Two CPU processes under torchrun (what `accelerate launch` does on GPUs): each writes its shards, both merge."
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_SCRIPT)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)], tmp_path / "samples", 0.0)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    # the two processes share stdout, so their reports can land on one line: find each JSON object, not each line
    reports = sorted((json.loads(m) for m in re.findall(r'\{"process"[^}]*\}', out)), key=str)
    assert reports == [{"process": i, "processes": 2, "rows": 12} for i in range(2)], out
    assert_same_samples(load_samples(tmp_path / "samples").to_dict(), reference)


def test_killed_run_resumes(tmp_path, reference):
    "SIGKILL a sampling process after its first shards; the rerun finishes the rest and equals an uninterrupted run."
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_SCRIPT)
    out = tmp_path / "samples"
    proc = _run([sys.executable, str(script)], out, 0.5)
    deadline = time.time() + 600
    while not (out / "shard-00001-of-00006").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("shard-*"))
    assert 2 <= len(finished) < 6, finished
    model, calls = tiny_lm(), []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    resumed = sample_responses(model, tiny_tokenizer(), PROMPTS, output_dir=out, **SETTINGS)
    assert len(calls) == 6 - len(finished)
    assert_same_samples(resumed.to_dict(), reference)
    assert not list(out.glob(".tmp-*"))


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(), tiny_tokenizer()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(3, len(WORDS) - 1), min_size=1, max_size=6),
                          st.lists(st.integers(1, len(WORDS) - 1), min_size=1, max_size=6)), min_size=1, max_size=7),
       st.integers(1, 4), st.randoms(use_true_random=False))
def test_logprobs_ignore_batching_and_order(lm, pairs, batch_size, rng):
    "Batch size and row order change padding and batch composition, never the log-probs."
    model, tokenizer = lm
    data = {"prompt_ids": [p for p, _ in pairs], "response_ids": [r for _, r in pairs]}
    one = sequence_logprobs(model, tokenizer, data, batch_size=1, progress=False)
    perm = list(range(len(pairs)))
    rng.shuffle(perm)
    shuffled = {k: [v[i] for i in perm] for k, v in data.items()}
    np.testing.assert_allclose(sequence_logprobs(model, tokenizer, shuffled, batch_size=batch_size, progress=False),
                               one[perm], atol=1e-5)
    assert (one < 0).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-10, 10), st.floats(-10, 10)), min_size=1, max_size=30),
       st.randoms(use_true_random=False))
def test_dual_inputs_regroup_rows(rows, rng):
    "Every row lands in its prompt's row of the arrays, in sample order; the mask marks exactly the rows."
    prompt_id = [p for p, _, _ in rows]
    sample_id = [sum(q == p for q in prompt_id[:i]) for i, p in enumerate(prompt_id)]
    table = list(zip(prompt_id, sample_id, [r for _, r, _ in rows], [g for _, _, g in rows]))
    rng.shuffle(table)
    ds = Dataset.from_dict(dict(zip(["prompt_id", "sample_id", "reward", "safety"], map(list, zip(*table)))))
    rewards, safety, mask = to_dual_inputs(ds)
    prompts = sorted(set(prompt_id))
    assert rewards.shape == mask.shape == safety.shape[:2] and safety.shape[2] == 1
    assert mask.sum(1).tolist() == [prompt_id.count(p) for p in prompts]
    for row, p in enumerate(prompts):
        group = sorted((s, r, g) for q, s, r, g in table if q == p)
        k = len(group)
        assert rewards[row, :k].tolist() == [r for _, r, _ in group]
        assert safety[row, :k, 0].tolist() == [g for _, _, g in group]
        assert not mask[row, k:].any() and (rewards[row, k:] == 0).all()


def test_calls_keep_process_state(lm, tmp_path):
    "Sampling, log-probs, scoring and digests leave the thread count and torch's random state as they were."
    model, tokenizer = lm
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
        with quiet_third_party():
            ds = sample_responses(model, tokenizer, PROMPTS, output_dir=tmp_path / "s", **SETTINGS)
        sequence_logprobs(model, tokenizer, ds, progress=False)
        score(ds, {"reward": CallableScorer(lambda ps, rs: [len(r) for r in rs])})
        weights_digest(model), tokenizer_digest(tokenizer), scorer_digest(CallableScorer(len))
        assert torch.get_num_threads() == threads
        assert torch.equal(torch.random.get_rng_state(), rng)
    finally: torch.set_num_threads(old)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=2.5), "`n` must be an integer; got 2.5"),                                             # DA4
    (dict(n="3"), "`n` must be an integer; got '3'"),                                             # DA5
    (dict(prompts="a b c"), "Wrap it in a list: ['a b c']"),                                      # DA6
    (dict(prompts="abc"), "`prompts` must be a list of prompt strings; got the single string 'abc'"),  # DA6b
    (dict(prompts=["a", None]), "`prompts[1]` must be a string; got None"),                        # DA7
])
def test_sampling_refuses_bad_input(kwargs, message):
    settings = dict(SETTINGS, prompts=PROMPTS) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)): sample_responses(tiny_lm(), tiny_tokenizer(), **settings)


def test_sampling_refuses_a_file_as_output_dir(tmp_path):
    "DA16"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"`output_dir` .* is a file"):
        sample_responses(tiny_lm(), tiny_tokenizer(), PROMPTS, output_dir=tmp_path / "file", **SETTINGS)


def test_score_refuses_non_numbers():
    "DA22"
    ds = Dataset.from_dict({"prompt": ["a", "b"], "response": ["c", "d"]})
    with pytest.raises(ValueError, match=re.escape("Scorer `reward` returned values that are not numbers (e.g. 'good')")):
        score(ds, {"reward": lambda ps, rs: ["good"] * len(ps)})
