"Update rules of the baselines against hand-computed steps and properties; short toy-world runs of each method."
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from safe_dual.refine import (ComputeMeter, constraint_jacobian, dual_step, refine, refined_multipliers,
                              safety_means, safety_standard_errors)
from safe_dual.baselines import (clipped_surrogate_loss, lagrangian_advantages, leave_one_out_baseline,
                                 log_lambda_step, ppo_lagrangian, primal_dual_dpo, run_summary, sacpo)
from safe_dual.dual import policy_metrics
from safe_dual.toy import exact_metrics, load_toy_world, one_thread

floats = st.floats(-3, 3, allow_nan=False)


def test_dual_step_by_hand():
    # lam = 0.5, E[g] = -0.4, b = -0.25, eta = 3: 0.5 - 3 (-0.4 + 0.25) = 0.95; and a step below zero is projected to 0
    np.testing.assert_allclose(dual_step([0.5], [-0.4], [-0.25], 3.0), [0.95], atol=1e-12)
    np.testing.assert_allclose(dual_step([0.1], [0.0], [-0.25], 1.0), [0.0], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), floats, floats), min_size=1, max_size=3), st.floats(0.01, 5))
def test_dual_step_is_the_projected_gradient_step(rows, eta):
    lam, g, b = map(np.array, zip(*rows))
    out = dual_step(lam, g, b, eta)
    assert np.all(out >= 0)
    np.testing.assert_allclose(out, np.maximum(lam - eta * (g - b), 0), atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-2, 2), floats, floats), min_size=1, max_size=3), st.floats(0.001, 1),
       st.one_of(st.none(), st.floats(0.5, 10)))
def test_log_lambda_step_is_safe_rlhf_sgd_step(rows, lr, lambda_max):
    "The original: SGD on -(episode_cost - threshold) * exp(log_lambda), then the clamp at log(lambda_max); cost = -g."
    log_lam, g, b = map(np.array, zip(*rows))
    param = torch.nn.Parameter(torch.tensor(log_lam, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=lr)
    (-(torch.tensor(-g) - torch.tensor(-b)) * param.exp()).sum().backward()
    opt.step()
    if lambda_max is not None:
        with torch.no_grad(): param.clamp_(max=math.log(lambda_max))
    np.testing.assert_allclose(log_lambda_step(log_lam, g, b, lr, lambda_max), param.detach().numpy(), atol=1e-10)


def test_log_lambda_step_by_hand():
    # lam = 2, window mean safety -0.35, b = -0.25, lr 0.1: log 2 + 0.1 * 2 * 0.1 = log 2 + 0.02
    np.testing.assert_allclose(log_lambda_step([math.log(2)], [-0.35], [-0.25], 0.1), [math.log(2) + 0.02], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), floats), min_size=2, max_size=12))
def test_leave_one_out_baseline_matches_brute_force(rows):
    groups, values = map(np.array, zip(*rows))
    if np.unique(groups, return_counts=True)[1].min() < 2:
        with pytest.raises(ValueError, match="`groups`"): leave_one_out_baseline(values, groups)
        return
    brute = [np.mean([values[j] for j in range(len(values)) if groups[j] == groups[i] and j != i]) for i in range(len(values))]
    np.testing.assert_allclose(leave_one_out_baseline(values, groups), brute, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(2, 4), st.floats(0.0, 2.0), st.integers(0, 10_000))
def test_lagrangian_advantage_is_a_baselined_tilted_return(m, n, kl_coeff, seed):
    "(A_r - lam.A_c)/(1 + sum lam) = [(r + lam.g)/(1 + sum lam) - kappa l] minus its leave-one-out mean."
    rng = np.random.default_rng(seed)
    B = 2 * n
    r, g, l, lam = rng.normal(size=B), rng.normal(size=(B, m)), rng.normal(size=B), rng.uniform(0, 2, m)
    groups = np.repeat([0, 1], n)
    ret = (r + g @ lam) / (1 + lam.sum()) - kl_coeff * l
    np.testing.assert_allclose(lagrangian_advantages(r, g, l, groups, lam, kl_coeff), ret - leave_one_out_baseline(ret, groups),
                               atol=1e-9)


def test_clipped_surrogate_at_ratio_one_is_reinforce():
    "Safe-RLHF takes one step per rollout (update_iters=1), at ratio 1: the clipped surrogate's gradient is REINFORCE's."
    rng = np.random.default_rng(0)
    logps = torch.tensor(rng.normal(size=16), requires_grad=True)
    adv = torch.tensor(rng.normal(size=16))
    clipped_surrogate_loss(logps, logps.detach(), adv).backward()
    ppo = logps.grad.clone()
    logps.grad = None
    (-(adv * logps).mean()).backward()
    np.testing.assert_allclose(ppo.numpy(), logps.grad.numpy(), atol=1e-15)


def test_clipped_surrogate_by_hand():
    # ratio e^0.5 = 1.65 > 1.2, A = 1: min(1.65, 1.2) = 1.2; ratio e^-0.5 = 0.61 < 0.8, A = -1: min(-0.61, -0.8) = -0.8
    loss = clipped_surrogate_loss(torch.tensor([0.5, -0.5]), torch.zeros(2), torch.tensor([1.0, -1.0]))
    assert abs(loss.item() - (-(1.2 - 0.8) / 2)) < 1e-7


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


@settings(max_examples=8, deadline=None)
@given(st.floats(0.01, 1.5), st.floats(0.01, 1.5), st.floats(0.5, 2.0))
def test_constraint_jacobian_matches_finite_differences(lam1, lam2, beta):
    world = load_toy_world()
    r, g, lam, h = world.rewards[:5], world.safety[:5], np.array([lam1, lam2]), 1e-5
    fd = np.stack([(policy_metrics(r, g, lam + h * e, beta)["safety"] - policy_metrics(r, g, lam - h * e, beta)["safety"]) / (2 * h)
                   for e in np.eye(2)], 1)
    np.testing.assert_allclose(constraint_jacobian(r, g, lam, beta), fd, atol=1e-6)


def test_refined_multipliers_solve_the_linear_model():
    J = np.array([[0.5, 0.1], [0.1, 0.4]])
    lam, realized, b = np.array([0.3, 0.2]), np.array([-0.3, -0.45]), np.array([-0.25, -0.4])
    new = refined_multipliers(lam, realized, b, J)
    np.testing.assert_allclose(realized + J @ (new - lam), b, atol=1e-12)  # the linearized constraint lands on b
    np.testing.assert_allclose(refined_multipliers([0.3], [-0.27], [-0.25], [[0.4]]), [0.35], atol=1e-12)


def test_safety_means_and_standard_errors(world):
    from datasets import Dataset
    d = Dataset.from_dict(dict(prompt_id=[0, 0, 1, 1], reward=[0.0] * 4, g=[-1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(safety_means(d, ["g"]), [0.0], atol=1e-12)
    np.testing.assert_allclose(safety_standard_errors(d, ["g"]), [math.sqrt(2 / 2) / 2], atol=1e-12)


def test_run_summary_counts_the_first_record_within_tolerance():
    recs = [dict(wall=w, samples=10 * k, grad_steps=k, metrics=dict(reward=rw, safety=[g], kl_to_optimum=0.1))
            for k, (w, rw, g) in enumerate([(1.0, 1.0, -0.4), (2.0, 0.9, -0.25), (3.0, 1.0, -0.26), (4.0, 1.0, -0.25)])]
    s = run_summary(recs, [-0.25], 1.0, [0.02], 0.05)
    assert s["reached"] == dict(wall=3.0, samples=20, grad_steps=2)
    assert s["total"]["wall"] == 4.0 and s["constraint_error"] == 0.0


TINY = dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, max_steps=2, per_device_train_batch_size=8)


def _setup(world):
    scorers = dict(reward=world.reward_scorer, safety=world.safety_scorers)
    evaluator = lambda model: exact_metrics(model, world)
    return scorers, evaluator, dict(max_new_tokens=world.max_new_tokens, batch_size=256)


def test_primal_dual_restart_trains_every_round_from_pi_ref(world):
    scorers, ev, kw = _setup(world)
    with one_thread(torch.device("cpu")):
        out = primal_dual_dpo(world.model, world.tokenizer, world.prompts, scorers, (-0.25, -0.4), 1.0, rounds=2, eta=1.0,
                              warm_start=False, n_samples=4, n_estimate=4, train_args=TINY, evaluator=ev, **kw)
    r1, r2 = out["records"]
    np.testing.assert_allclose(r2["lam"], dual_step(r1["lam"], r1["safety_estimate"], [-0.25, -0.4], 1.0), atol=1e-12)
    np.testing.assert_allclose(out["lam"], dual_step(r2["lam"], r2["safety_estimate"], [-0.25, -0.4], 1.0), atol=1e-12)
    assert r2["grad_steps"] == 4 and r2["samples"] == 24 * (4 + 2 * 4)
    np.testing.assert_allclose(exact_metrics(world.model, world)["kl"], 0.0, atol=1e-9)  # pi_ref itself is never trained


def test_ppo_lagrangian_lambda_follows_the_window_and_respects_the_cap(world):
    scorers, ev, kw = _setup(world)
    with one_thread(torch.device("cpu")):
        out = ppo_lagrangian(world.model, world.tokenizer, world.prompts, scorers, (0.0, 0.0), 1.0, steps=3, lambda_lr=5.0,
                             lambda_max=2.0, prompts_per_step=4, n=2, eval_every=1, evaluator=ev, **kw)
    # thresholds 0 are never met (g <= 0 and hazards occur): lam climbs from 1 and stops at the cap
    lams = np.array([r["lam"] for r in out["records"]])
    assert np.all(np.diff(lams, axis=0) >= -1e-12) and np.all(lams <= 2.0 + 1e-12)
    assert [r["grad_steps"] for r in out["records"]] == [0, 1, 2, 3]


def test_sacpo_product_grid_for_two_constraints(world):
    scorers, ev, kw = _setup(world)
    with one_thread(torch.device("cpu")):
        out = sacpo(world.model, world.tokenizer, world.prompts, scorers, (-0.25, -0.4), 1.0, grid=(0.25, 1.0), n_samples=4,
                    n_estimate=4, train_args=TINY, evaluator=ev, **kw)
    assert [g["lam"] for g in out["grid"]] == [[0.25, 0.25], [0.25, 1.0], [1.0, 0.25], [1.0, 1.0]]
    assert out["records"][-1]["grad_steps"] == 2 * 5 and out["records"][-1]["grid_size"] == 4


def test_refine_with_a_dual_step(world):
    scorers, ev, kw = _setup(world)
    meter = ComputeMeter()
    with one_thread(torch.device("cpu")):
        pd = primal_dual_dpo(world.model, world.tokenizer, world.prompts[:4], scorers, (-0.25, -0.4), 1.0, rounds=1,
                             n_samples=4, n_estimate=2, train_args=TINY, **kw)
        from safe_dual.refine import sample_scored
        data = sample_scored(world.model, world.tokenizer, world.prompts[:4],
                             dict(reward=world.reward_scorer, safety_1=world.safety_scorers[0], safety_2=world.safety_scorers[1]),
                             4, meter, **kw)
        out = refine(pd["model"], world.tokenizer, world.prompts[:4], scorers, data, [0.3, 0.3], (-0.25, -0.4), 1.0, rounds=1,
                     n_estimate=4, train_args=TINY, eta=2.0, z=0.0, meter=meter, **kw)
    rec = out["records"][0]
    np.testing.assert_allclose(rec["lam"], dual_step([0.3, 0.3], rec["safety_estimate"], [-0.25, -0.4], 2.0), atol=1e-12)


def test_mocan_refine_option_refines_saves_and_resumes(world, tmp_path):
    from safe_dual.mocan import MoCAN
    scorers, ev, _ = _setup(world)
    make = lambda refine: MoCAN(world.new_model(), world.tokenizer, world.prompts, scorers, (-0.25, -0.4), 1.0, n_samples=4,
                                output_dir=tmp_path, max_new_tokens=world.max_new_tokens, batch_size=256, train_args=TINY,
                                evaluator=ev, bootstrap=0, refine=refine)
    with pytest.raises(ValueError, match="`refine`"): make(-1)
    with one_thread(torch.device("cpu")):
        mo = make(1)
        first = mo.run()
        refined = mo.run_folder.result("train")["refine"]
        assert len(refined["records"]) == 1 and refined["records"][0]["round"] == 1
        again = make(1).run()  # same settings: nothing is trained again, the saved (refined) model is evaluated
    np.testing.assert_allclose(again["trained"]["safety"], first["trained"]["safety"], atol=1e-6)
    assert MoCAN.refine == 0  # a class default, so PeCAN (which has its own `__init__`) stays one-shot
