"Property and integration tests of the toy world (safe_dual.toy)."
import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from safe_dual.sampling import sample_responses, sequence_logprobs
from safe_dual.toy import (ToyConfig, _toy_model, enumerate_logprobs, exact_logprobs, exact_metrics, exact_optimum,
                           exact_policy, load_toy_world, toy_cache_file, toy_harm, toy_preferences, toy_responses,
                           toy_reward, toy_tokenizer)
from safe_dual.train import PseudoPreferenceConfig, PseudoPreferenceTrainer

WORDS = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


def slow_logprob(model, prompt_ids, response_ids):
    "log pi(response | prompt), one full forward pass."
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([list(prompt_ids) + list(response_ids)])).logits[0].double().log_softmax(-1)
    return sum(logps[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(response_ids))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 4), L=st.integers(1, 3), P=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_enumeration_is_a_distribution_and_matches_forward_passes(T, L, P, seed):
    config = ToyConfig(words=WORDS[:T], hazards=WORDS[:1], max_len=L, prompt_len=1, n_prompts=1, n_eval_prompts=0,
                       stop=(0.5,) * L, hidden_size=8, n_heads=2)
    torch.manual_seed(seed)
    model = _toy_model(config)
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(0, T + 1, size=(3, P))                   # any tokens, EOS included
    logps = enumerate_logprobs(model, prompt_ids, T, L, batch_size=int(rng.integers(1, 64)))
    responses, response_ids = toy_responses(config)
    assert logps.shape == (3, sum(T**l for l in range(L + 1))) == (3, len(responses))
    np.testing.assert_allclose(np.exp(logps).sum(1), 1.0, atol=1e-12)
    for k in rng.choice(len(responses), size=min(6, len(responses)), replace=False):
        assert abs(logps[2, k] - slow_logprob(model, prompt_ids[2], response_ids[k])) < 1e-5


@given(prompt=st.permutations(WORDS).map(lambda w: " ".join(w[:2])),
       response=st.lists(st.sampled_from(WORDS), max_size=5).map(" ".join))
def test_scores(prompt, response):
    r, g = toy_reward([prompt], [response])[0], toy_harm([prompt], [response], "a")[0]
    words, asked = response.split(), prompt.split()
    assert r <= sum(np.log1p(words.count(w)) for w in asked) + 1e-12
    assert r >= -0.25 * len(words)
    assert g == -words.count("a") * (2 if "a" in asked else 1)
    assert toy_reward([prompt], [""])[0] == 0 == toy_harm([prompt], [""], "a")[0]


@given(words=st.lists(st.sampled_from(ToyConfig().words), max_size=6))
def test_tokenizer_round_trip(words):
    tok = toy_tokenizer(ToyConfig().words, padding_side="right")
    text = " ".join(words)
    ids = tok(text).input_ids
    assert len(ids) == len(words) and tok.decode(ids + [0], skip_special_tokens=True) == text


def test_world_tables(world):
    M, K, m = world.safety.shape
    assert (M, K, m) == (24, 585, 2) and len(world.eval_prompts) == 8
    assert not set(world.prompts) & set(world.eval_prompts)
    np.testing.assert_array_equal(world.ref_probs, exact_policy(world.model, world))
    np.testing.assert_array_equal(world.eval_ref_probs, exact_policy(world.model, world, world.eval_prompts))
    np.testing.assert_array_equal(world.rewards, toy_reward([x for x in world.prompts for _ in range(K)],
                                                            world.responses * M).reshape(M, K))
    assert (world.safety <= 0).all() and world.safety.std() > 0.5
    sd = np.sqrt(np.einsum("mk,mkj->j", world.ref_probs, world.safety**2) / M)
    assert (sd > 0.5).all()                                   # g has real spread under pi_ref


def test_new_prompts_and_reference_copy(world):
    new = [" ".join(t) for t in itertools.permutations(world.config.words, 3)][:5]
    new = [x for x in new if x not in world.prompts + world.eval_prompts]
    model = world.new_model()
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.1 * torch.randn_like(p))   # a changed model ...
    rewards, safety, ref_probs = world.tables(new)                      # ... does not change pi_ref
    np.testing.assert_allclose(ref_probs, exact_policy(world.model, world, new), atol=1e-12)
    assert exact_metrics(model, world, new)["kl"] > 1e-3
    assert rewards.shape == (len(new), 585) and safety.shape == (len(new), 585, 2)
    with pytest.raises(ValueError, match="one length"):
        exact_logprobs(world.model, world, ["math", "math code"])


def test_sampling_matches_exact_policy(world):
    "sample_responses (the package's sampler) draws from exactly the enumerated distribution."
    n, prompts = 1500, world.prompts[:2]
    ds = sample_responses(world.model, world.tokenizer, prompts, n=n, max_new_tokens=world.max_new_tokens,
                          batch_size=750, seed=3, progress=False)
    logps = exact_logprobs(world.model, world, prompts)
    pid, k = np.array(ds["prompt_id"]), world.index(ds["response"])
    np.testing.assert_allclose(ds["ref_logp"], logps[pid, k], atol=1e-5)
    assert [world.response_ids[i] for i in k] == ds["response_ids"]
    np.testing.assert_allclose(sequence_logprobs(world.model, world.tokenizer, ds, batch_size=512, progress=False),
                               logps[pid, k], atol=1e-5)
    for i in range(2):
        for values in [world.rewards[i], *world.safety[i].T]:
            p = world.ref_probs[i]
            mean, sd = p @ values, np.sqrt(p @ (values - p @ values) ** 2)
            assert abs(values[k[pid == i]].mean() - mean) < 4 * sd / np.sqrt(n)
        lengths = np.array(ds["response_len"])[pid == i]
        for length in range(world.max_new_tokens + 1):     # length law, incl. EOS-at-each-length mass
            words = np.array([len(r.split()) for r in world.responses])
            q = world.ref_probs[i][words == length].sum()
            freq = (np.array([len(world.responses[j].split()) for j in k[pid == i]]) == length).mean()
            assert abs(freq - q) < 4 * np.sqrt(q * (1 - q) / n)
        assert lengths.max() <= world.max_new_tokens


def test_peft_lora_and_trainer(world, tmp_path):
    "LoRA targets the Llama's linear layers; a Trainer run on toy preferences moves the exact policy."
    peft_model = get_peft_model(world.new_model(), LoraConfig(r=4, target_modules="all-linear"))
    np.testing.assert_allclose(exact_policy(peft_model, world), world.ref_probs, atol=1e-12)   # B = 0 at init
    prefs = toy_preferences(world, 256, score="reward", seed=0)
    args = PseudoPreferenceConfig(output_dir=str(tmp_path), beta=0.5, loss_type="hard", max_steps=10, learning_rate=2e-2,
                                  per_device_train_batch_size=64, report_to=[], logging_steps=5, save_strategy="no",
                                  use_cpu=True, lora_r=4)
    trainer = PseudoPreferenceTrainer(peft_model, world.tokenizer, prefs, args)
    trainer.train()
    trained = exact_metrics(trainer.model, world)
    assert trained["kl"] > 1e-3 and trained["reward"] > exact_metrics(world.model, world)["reward"]
    with trainer.model.disable_adapter():
        np.testing.assert_allclose(exact_policy(trainer.model, world), world.ref_probs, atol=1e-12)


def test_optimum_conflict(world):
    ref = world.metrics_of(world.ref_probs)
    free = exact_optimum(world, -10.0 * np.ones(2), 0.5)          # a threshold nothing violates: lam = 0
    assert (free.lam == 0).all() and (free.expected_safety < ref["safety"] - 0.15).all()
    constrained = exact_optimum(world, ref["safety"], 0.5, return_weights=True)
    assert (constrained.lam > 0).all()
    np.testing.assert_allclose(constrained.expected_safety, ref["safety"], atol=1e-8)
    metrics = world.metrics_of(constrained.weights)
    np.testing.assert_allclose([metrics["reward"], metrics["kl"]], [constrained.expected_reward, constrained.kl], atol=1e-9)
    assert ref["reward"] < constrained.expected_reward < free.expected_reward


def test_preferences_errors_and_ids(world):
    prefs = toy_preferences(world, 100, score=0, seed=2)
    assert all(len(ids) == 3 or ids[-1] == 0 for ids in prefs["chosen_ids"])   # EOS unless L words
    assert prefs["prompt_id"][:3] == [0, 1, 2]
    assert toy_preferences(world, 50, seed=5)["chosen"] == toy_preferences(world, 50, seed=5)["chosen"]
    for bad in [2, -1, True, "safety"]:
        with pytest.raises(ValueError, match="`score`"): toy_preferences(world, 10, score=bad)
    with pytest.raises(ValueError, match="`n_pairs`"): toy_preferences(world, 0)


def test_build_is_deterministic_and_cached(tmp_path):
    config = ToyConfig(steps=5)
    a = load_toy_world(tmp_path / "a", seed=1, config=config)
    b = load_toy_world(tmp_path / "b", seed=1, config=config)
    for k, v in a.model.state_dict().items(): assert torch.equal(v, b.model.state_dict()[k])
    path = toy_cache_file(config, 1, tmp_path / "a")
    stamp = path.stat().st_mtime_ns
    start = time.perf_counter()
    c = load_toy_world(tmp_path / "a", seed=1, config=config)
    assert path.stat().st_mtime_ns == stamp and time.perf_counter() - start < 5
    np.testing.assert_array_equal(a.ref_probs, c.ref_probs)
    assert c.fit_kl == a.fit_kl > 0
    assert toy_cache_file(config, 2, tmp_path) != toy_cache_file(config, 1, tmp_path)
    assert a.prompts != load_toy_world(tmp_path / "a", seed=2, config=config).prompts


@pytest.mark.parametrize("kwargs, message", [(dict(words=("a", "a")), "`words`"), (dict(words=("a b",)), "`words`"),
                                             (dict(hazards=()), "`hazards`"), (dict(max_len=0, stop=()), "`stop`"),
                                             (dict(stop=(0.1, 1.0, 0.2)), "`stop`"), (dict(n_eval_prompts=400), "at most"),
                                             (dict(hidden_size=30), "`hidden_size`")])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message): ToyConfig(**kwargs)
