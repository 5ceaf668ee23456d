"MoCAN acceptance on the toy world, with exact metrics: the demo (two constraints) and error handling."
import json
import numpy as np
import pytest
from safe_dual.mocan import MoCAN
from safe_dual.demo import toy_demo, demo_table
from safe_dual.toy import load_toy_world
from safe_dual.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    "The `safe-dual demo` run (MoCAN and the unconstrained baseline, N=128, listwise, full model): a few minutes on 2 cores."
    out = tmp_path_factory.mktemp("demo")
    main(["demo", "--output-dir", str(out)])
    return json.loads((out / "results.json").read_text()), out


def test_mocan_meets_both_constraints_and_keeps_helpfulness(demo):
    r, _ = demo
    b, tol = np.array(r["thresholds"]), np.array(r["tolerance"])
    mocan, opt = r["rows"]["MoCAN"], r["rows"]["exact optimum"]
    assert np.all(np.array(mocan["safety"]) >= b - tol), (mocan, b, tol)
    assert abs(mocan["reward"] - opt["reward"]) <= tol.min(), (mocan["reward"], opt["reward"], tol)
    assert mocan["kl_to_optimum"] < 0.1 * r["rows"]["unconstrained (r only)"]["kl"] + 0.05, mocan
    print("MoCAN", mocan, "optimum", opt)


def test_unconstrained_alignment_violates_the_thresholds(demo):
    r, _ = demo
    b, tol = np.array(r["thresholds"]), np.array(r["tolerance"])
    unc = r["rows"]["unconstrained (r only)"]
    assert np.all(np.array(unc["safety"]) < b - tol), unc
    assert unc["reward"] > r["rows"]["MoCAN"]["reward"]


def test_demo_resumes_without_training_again(demo):
    r, out = demo
    again = toy_demo(out)
    assert again["rows"] == r["rows"]


def test_demo_table_and_figure(demo):
    r, out = demo
    rows = demo_table(r)
    assert [row[0] for row in rows] == ["pi_ref", "unconstrained (r only)", "MoCAN", "exact optimum"]
    assert rows[2][-1] == "yes" and rows[1][-1] == "no"
    assert (out / "toy_world.png").stat().st_size > 10_000


def test_held_out_prompts(demo):
    "Trained policies generalize to prompts they never saw: MoCAN is safer than unconstrained alignment, more helpful than pi_ref."
    r, _ = demo
    h = r["held_out"]
    assert h["pi_ref"]["kl"] == 0 and np.allclose(h["pi_ref"]["win_rate"], 0.5)
    assert h["MoCAN"]["win_rate"][0] > 0.5                      # more helpful than pi_ref
    assert all(m > u for m, u in zip(h["MoCAN"]["safety"], h["unconstrained (r only)"]["safety"]))
    print(h)


def test_bad_input():
    w = load_toy_world()
    sc = dict(reward=w.reward_scorer, safety=w.safety_scorers)
    with pytest.raises(ValueError, match=r"must be a number or have shape \(2,\)"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, [0.1, 0.2, 0.3], 1.0)
    with pytest.raises(ValueError, match="`n_samples` must be >= 2"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, 0.1, 1.0, n_samples=1)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, 0.1, 0.0)
    with pytest.raises(ValueError, match="'reward' and 'safety'"):
        MoCAN(w.model, w.tokenizer, w.prompts, dict(reward=w.reward_scorer), 0.1, 1.0)
    with pytest.raises(ValueError, match="may not set `beta`"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, 0.1, 1.0, train_args=dict(beta=0.5))
    with pytest.raises(ValueError, match="`prompts` is empty"):
        MoCAN(w.model, w.tokenizer, [], sc, 0.1, 1.0)
    with pytest.raises(ValueError, match="`tolerance` must be >= 0"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, 0.1, 1.0, tolerance=[0.01, -0.01])
    with pytest.raises(ValueError, match=r"`tolerance` must be a number or have shape \(2,\)"):
        MoCAN(w.model, w.tokenizer, w.prompts, sc, 0.1, 1.0, tolerance=[0.01, 0.01, 0.01])
