"PeCAN on the toy world: which stages a change reruns, named and single safety sets, the listwise path, held-out calibration."
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safe_dual.pecan import PeCAN, fit_bt_scale
from safe_dual.toy import load_toy_world, exact_metrics, toy_preferences

TINY = dict(learning_rate=1e-2, num_train_epochs=1, per_device_train_batch_size=32, logging_strategy="no",
            save_strategy="no", disable_tqdm=True, lora_r=4)


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)  # width-32 model: one thread is faster on a shared 2-core box
    return load_toy_world()


def pecan(world, out, safety_data, margins, **kwargs):
    return PeCAN(world.new_model(), world.tokenizer, world.prompts, toy_preferences(world, 48, "reward", seed=1), safety_data,
                 margins=margins, beta=1.0, n_samples=3, output_dir=out, max_new_tokens=world.max_new_tokens, batch_size=32,
                 prealign_args=TINY, train_args=kwargs.pop("train_args", TINY), **kwargs)


def first_safety(world):
    "Exact evaluator reporting g_1 only, for runs with one safety set."
    return lambda model: (lambda e: dict(e, safety=e["safety"][:1]))(exact_metrics(model, world))


def stamps(out, stages):
    return {s: (out / s / "stage.json").stat().st_mtime_ns for s in stages}


def test_new_safety_data_retrains_only_its_adapter(world, tmp_path):
    first = [toy_preferences(world, 48, 0, seed=2), toy_preferences(world, 48, 1, seed=3)]
    p = pecan(world, tmp_path, first, margins=0.0)
    p.dual()
    stages = ("prealign/helpful", "prealign/safety_1", "prealign/safety_2", "collect", "dual")
    before = stamps(tmp_path, stages)
    p = pecan(world, tmp_path, [first[0], toy_preferences(world, 48, 1, seed=4)], margins=0.0)
    p.dual()
    after = stamps(tmp_path, stages)
    assert {s for s in stages if after[s] != before[s]} == {"prealign/safety_2", "collect", "dual"}


def test_named_single_safety_set_and_listwise(world, tmp_path):
    p = pecan(world, tmp_path, {"harmless": toy_preferences(world, 48, 0, seed=2)}, margins=0.05,
              train_args=dict(TINY, loss_type="listwise"), evaluator=lambda model: exact_metrics(model, world))
    with pytest.raises(ValueError, match="returned 2 safety values for the 1 safety sets"): p.run()
    p.evaluator = first_safety(world)
    result = p.run()
    assert "harmless_logp" in p.collect().column_names
    assert p.label().column_names[:4] == ["prompt_id", "prompt", "responses", "scores"]
    assert np.shape(result["lam"]) == (1,) and np.shape(result["improvement"]["safety"]) == (1,)
    assert result["predicted"]["safety"][0] >= 0.05 - 1e-9
    assert result["met"] == [bool(result["improvement"]["safety"][0] >= 0.05)]


def test_rerun_with_same_settings_loads_everything(world, tmp_path):
    safety = toy_preferences(world, 48, 0, seed=2)
    evaluator = first_safety(world)
    first = pecan(world, tmp_path, safety, margins=0.0, evaluator=evaluator).run()
    stages = ("prealign/helpful", "prealign/safety", "collect", "dual", "label", "train", "evaluate")
    before = stamps(tmp_path, stages)
    again = pecan(world, tmp_path, safety, margins=0.0, evaluator=evaluator).run()
    assert stamps(tmp_path, stages) == before
    assert again == first


def test_holdout_zero_reads_the_nominal_temperatures(world, tmp_path):
    p = pecan(world, tmp_path, toy_preferences(world, 48, 0, seed=2), margins=0.0, beta_r=0.5, beta_g=2.0, holdout=0.0)
    dual = p.dual()
    assert "calibration" not in p.run_folder.result("prealign/helpful")
    assert (dual["fitted_beta_r"], dual["fitted_beta_g"]) == (0.5, [2.0])


def test_holdout_fits_on_pairs_it_did_not_train_on(world, tmp_path):
    data = toy_preferences(world, 48, 0, seed=2)
    p = pecan(world, tmp_path, data, margins=0.0, holdout=0.25)
    train, heldout = p._split("safety", data)
    assert (len(train), len(heldout)) == (36, 12)
    rows = lambda d: sorted(zip(d["prompt"], d["chosen"], d["rejected"]))
    assert sorted(rows(train) + rows(heldout)) == rows(data)
    p.prealign()
    calibration = p.run_folder.result("prealign/safety")["calibration"]
    assert calibration["pairs"] == 12 and calibration["beta"] == 1.0
    assert p.fitted_beta_of("safety") == (calibration["fitted_beta"] if calibration["used"] else 1.0)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(0.2, 5.0), stretch=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_fit_bt_scale_soft_labels_and_stretch(scale, stretch, seed):
    "Soft labels at a scale give it back exactly; stretching the margins by k divides the scale by k."
    margins = np.random.default_rng(seed).normal(0, 1, 200)
    labels = 1 / (1 + np.exp(-scale * margins))
    c, se = fit_bt_scale(margins, labels)
    assert abs(c - scale) < 1e-6 * scale and se > 0
    assert abs(fit_bt_scale(stretch * margins, labels)[0] - scale / stretch) < 1e-6 * scale / stretch


def test_tolerance_decides_met_without_evaluating_again(world, tmp_path):
    "`met` is improvement >= margin - tolerance; a new tolerance is applied to the saved evaluation, which is not redone."
    safety, evaluator = toy_preferences(world, 48, 0, seed=2), first_safety(world)
    strict = pecan(world, tmp_path, safety, margins=0.05, evaluator=evaluator).run()
    gain = strict["improvement"]["safety"][0]
    assert strict["tolerance"] == [0.0] and strict["met"] == [bool(gain >= 0.05)]
    before = stamps(tmp_path, ("train", "evaluate"))
    tol = abs(0.05 - gain) + 0.01  # wide enough either way
    loose = pecan(world, tmp_path, safety, margins=0.05, evaluator=evaluator, tolerance=tol).run()
    assert stamps(tmp_path, ("train", "evaluate")) == before
    assert loose["met"] == [True] and loose["tolerance"] == [tol] and loose["improvement"] == strict["improvement"]
    with pytest.raises(ValueError, match="`tolerance` must be >= 0"):
        pecan(world, tmp_path, safety, margins=0.05, tolerance=-0.1)
