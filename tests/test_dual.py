"""Property tests of `safe_dual.dual`: derivatives, convexity, KKT, invariances, the preference form, and strong
duality against an exact primal solve over the probability simplex that never uses the dual."""
import itertools
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from safe_dual.dual import (InfeasibleConstraintError, bootstrap_dual, dual_objective, policy_metrics, solve_dual,
                            solve_dual_preference, threshold_path, tilted_weights)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # ESS warnings are expected on tiny random problems
settings.register_profile('dual', max_examples=40, deadline=None, derandomize=True)
settings.load_profile('dual')


@st.composite
def problems(draw, max_m=3, weighted=None):
    "A random problem: rewards (M, N), safety (M, N, m), beta, optional reference weights, lam >= 0."
    M, N, m = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(1, max_m))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    rewards, safety = scale * rng.normal(size=(M, N)), rng.normal(size=(M, N, m))
    beta = draw(st.sampled_from([0.2, 0.5, 1.0, 3.0]))
    use_weights = draw(st.booleans()) if weighted is None else weighted
    weights = rng.dirichlet(np.ones(N), size=M) if use_weights else None
    lam = rng.uniform(0, 2, size=m)
    return rewards, safety, beta, weights, lam, rng


def feasible_thresholds(rewards, safety, beta, weights, rng, slack):
    "Thresholds reached strictly by some tilted policy: E_{pi_lam}[g] - slack at a random lam."
    lam = rng.uniform(0, 3, size=safety.shape[2])
    return policy_metrics(rewards, safety, lam, beta, weights)['safety'] - slack


@given(problems())
def test_gradient_and_hessian_match_finite_differences(p):
    rewards, safety, beta, weights, lam, rng = p
    b, eps = rng.normal(size=safety.shape[2]), 1e-5
    lam = lam + 2 * eps  # central differences stay in lam >= 0
    value, grad, hess = dual_objective(rewards, safety, b, lam, beta, weights)
    for j, e in enumerate(np.eye(len(lam))):
        up = dual_objective(rewards, safety, b, lam + eps * e, beta, weights)
        down = dual_objective(rewards, safety, b, lam - eps * e, beta, weights)
        np.testing.assert_allclose((up[0] - down[0]) / (2 * eps), grad[j], atol=1e-6 * (1 + abs(value)))
        np.testing.assert_allclose((up[1] - down[1]) / (2 * eps), hess[:, j], atol=1e-6 * (1 + np.abs(grad).max()))
    np.testing.assert_allclose(hess, hess.T, atol=1e-15)


@given(problems(), st.floats(0.05, 0.95))
def test_convex_along_random_lines(p, t):
    rewards, safety, beta, weights, lam, rng = p
    b = rng.normal(size=safety.shape[2])
    other = rng.uniform(0, 2, size=len(lam))
    D = lambda x: dual_objective(rewards, safety, b, x, beta, weights)[0]
    assert D(t * lam + (1 - t) * other) <= t * D(lam) + (1 - t) * D(other) + 1e-12 * (1 + abs(D(lam)))
    d = other - lam
    assert d @ dual_objective(rewards, safety, b, lam, beta, weights)[2] @ d >= -1e-12


@given(problems(), st.sampled_from([0.0, 0.05, 0.3]))
def test_kkt_conditions_at_the_solution(p, slack):
    rewards, safety, beta, weights, _, rng = p
    b = feasible_thresholds(rewards, safety, beta, weights, rng, slack + 1e-3)
    res = solve_dual(rewards, safety, b, beta, weights)
    grad = res.expected_safety - b
    assert res.converged and res.grad_norm <= 1e-9 * np.abs(safety).max()
    assert (res.lam >= 0).all() and (grad >= -1e-8).all()
    np.testing.assert_allclose(res.lam * grad, 0, atol=1e-8 * (1 + res.lam.max()))
    np.testing.assert_allclose(dual_objective(rewards, safety, b, res.lam, beta, weights)[1], grad, atol=1e-12)


@given(problems())
def test_lam_invariant_to_per_prompt_constants_in_rewards(p):
    rewards, safety, beta, weights, _, rng = p
    b = feasible_thresholds(rewards, safety, beta, weights, rng, 0.02)
    shift = rng.normal(scale=50, size=(len(rewards), 1))
    res, shifted = solve_dual(rewards, safety, b, beta, weights), solve_dual(rewards + shift, safety, b, beta, weights)
    np.testing.assert_allclose(shifted.lam, res.lam, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(shifted.value - shift.mean(), res.value, rtol=1e-10, atol=1e-9)


@given(problems(), st.sampled_from([1e-3, 1e3, 1e5]))
def test_scale_invariance_and_stability_for_huge_r_over_beta(p, c):
    "lam*(c r, c g, c b, c beta) = lam*(r, g, b, beta); with c = 1e5 the exponents r/beta stay the same, values grow."
    rewards, safety, beta, weights, _, rng = p
    b = feasible_thresholds(rewards, safety, beta, weights, rng, 0.02)
    res, scaled = solve_dual(rewards, safety, b, beta, weights), solve_dual(c * rewards, c * safety, c * b, c * beta, weights)
    np.testing.assert_allclose(scaled.lam, res.lam, rtol=1e-6, atol=1e-7)


@given(problems(max_m=1, weighted=False), st.sampled_from([1e3, 1e5]))
def test_stable_when_rewards_dwarf_beta(p, c):
    "r/beta up to ~1e6 (exp overflows beyond ~709): metrics match a max-shifted softmax computed by hand."
    rewards, safety, beta, _, lam, _ = p
    res = solve_dual(c * rewards, safety, -10.0, beta)
    z = c * rewards / beta
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    assert res.lam[0] == 0 and np.isfinite([res.value, res.kl]).all()
    np.testing.assert_allclose(res.expected_reward, (q * c * rewards).sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(res.kl, (q * np.log(np.where(q > 0, q * rewards.shape[1], 1.0))).sum(1).mean(), atol=1e-9 * c)


@given(problems(weighted=True), st.floats(0.1, 2.0), st.floats(0.1, 2.0))
def test_preference_form_equals_model_based_form(p, beta_r, beta_g):
    rewards, safety, beta, ref_probs, _, rng = p
    m = safety.shape[2]
    log_softmax = lambda z: z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    ref_logps = np.log(ref_probs)
    helpful_logps = log_softmax(ref_logps + rewards / beta_r)
    safety_logps = np.stack([log_softmax(ref_logps + safety[..., j] / beta_g) for j in range(m)], -1)
    b = feasible_thresholds(rewards, safety, beta, ref_probs, rng, 0.02)
    ref_safety = (ref_probs[..., None] * safety).sum(1).mean(0)
    by_hand = solve_dual(rewards, safety, b, beta, weights=ref_probs)
    pref = solve_dual_preference(ref_logps, helpful_logps, safety_logps, b - ref_safety, beta, beta_r, beta_g,
                                 weights=ref_probs)
    np.testing.assert_allclose(pref.lam, by_hand.lam, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(pref.expected_safety, by_hand.expected_safety - ref_safety, atol=1e-8)


# --- strong duality against an exact primal solve that does not use the dual --------------------------------------

def _golden_max(f, lo, hi, iters=90):
    "Maximum of a concave function on [lo, hi] by golden-section search."
    ratio = (np.sqrt(5) - 1) / 2
    a, b = lo + (1 - ratio) * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa < fb: lo, a, fa = a, b, fb; b = lo + ratio * (hi - lo); fb = f(b)
        else: hi, b, fb = b, a, fa; a = lo + (1 - ratio) * (hi - lo); fa = f(a)
    return max(fa, fb, f(lo), f(hi))


def primal_brute_force(rewards, safety, b, beta, weights, policy):
    """max over policies pi(u, v) = policy(u, v) (affine, two free parameters) of E_x[E_pi r - beta KL(pi||w)]
    subject to pi >= 0 and E_x E_pi[g] >= b: a concave maximization over a polygon, solved by nested golden-section
    searches (the max over v of a jointly concave function is concave in u)."""
    c0 = policy(0.0, 0.0).ravel()
    cu, cv = policy(1.0, 0.0).ravel() - c0, policy(0.0, 1.0).ravel() - c0
    M = len(rewards)
    gsum = safety.reshape(-1, safety.shape[-1]) / M
    # every constraint as a0 + au u + av v >= 0
    A = np.concatenate([np.stack([c0, cu, cv], 1), np.stack([c0 @ gsum - b, cu @ gsum, cv @ gsum], 1)])

    def objective(u, v):
        pi = policy(u, v).clip(0, None)
        kl = (pi * np.log(np.where(pi > 0, pi / weights, 1.0))).sum(1)
        return ((pi * rewards).sum(1) - beta * kl).mean()

    def v_range(u):
        lo, hi = -np.inf, np.inf
        for a0, au, av in A:
            rhs = a0 + au * u
            if abs(av) < 1e-15:
                if rhs < -1e-12: return None
            elif av > 0: lo = max(lo, -rhs / av)
            else: hi = min(hi, -rhs / av)
        return (lo, hi) if lo <= hi else None

    vertices = []  # u of the polygon's corners: intersections of two constraint lines that satisfy all constraints
    for first, second in itertools.combinations(A, 2):
        lines = np.array([first[1:], second[1:]])
        if abs(np.linalg.det(lines)) < 1e-14: continue
        u, v = np.linalg.solve(lines, -np.array([first[0], second[0]]))
        if (A[:, 0] + A[:, 1] * u + A[:, 2] * v >= -1e-10).all(): vertices.append(u)
    u_lo, u_hi = min(vertices), max(vertices)

    def best_given_u(u):
        rng_v = v_range(u)
        return -np.inf if rng_v is None else _golden_max(lambda v: objective(u, v), *rng_v)
    return _golden_max(best_given_u, u_lo, u_hi)


def _one_prompt_three_responses(u, v): return np.array([[u, v, 1 - u - v]])
def _two_prompts_two_responses(u, v): return np.array([[u, 1 - u], [v, 1 - v]])


@settings(max_examples=12)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(_one_prompt_three_responses, 1, 3), (_two_prompts_two_responses, 2, 2)]),
       st.integers(1, 2), st.sampled_from([0.3, 1.0]), st.sampled_from([0.02, 0.3]))
def test_strong_duality_against_exact_primal_on_the_simplex(seed, shape, m, beta, slack):
    policy, M, N = shape
    rng = np.random.default_rng(seed)
    rewards, safety = rng.normal(size=(M, N)), rng.normal(size=(M, N, m))
    weights = rng.dirichlet(np.ones(N), size=M)
    b = feasible_thresholds(rewards, safety, beta, weights, rng, slack)
    res = solve_dual(rewards, safety, b, beta, weights, return_weights=True)
    primal = primal_brute_force(rewards, safety, b, beta, weights, policy)
    np.testing.assert_allclose(primal, res.value, atol=1e-8)
    assert (res.expected_safety >= b - 1e-9).all()
    np.testing.assert_allclose(res.expected_reward - beta * res.kl, primal, atol=1e-8)


# --- agreement, inputs, errors ---------------------------------------------------------------------------------------

@settings(max_examples=15)
@given(problems(max_m=1))
def test_pgd_agrees_with_newton(p):
    rewards, safety, beta, weights, _, rng = p
    b = feasible_thresholds(rewards, safety, beta, weights, rng, 0.05)
    newton, pgd = solve_dual(rewards, safety, b, beta, weights), solve_dual(rewards, safety, b, beta, weights, method='pgd')
    if pgd.converged: np.testing.assert_allclose(pgd.lam, newton.lam, atol=1e-3 * (1 + newton.lam[0]))


@given(problems())
def test_mask_equals_dropping_responses_and_torch_equals_numpy(p):
    rewards, safety, beta, weights, lam, rng = p
    M, N = rewards.shape
    mask = rng.random((M, N)) < 0.7
    mask[:, 0] = True
    padded_r, padded_g = np.where(mask, rewards, np.nan), np.where(mask[..., None], safety, np.inf)
    q = tilted_weights(padded_r, padded_g, lam, beta, weights, mask)
    for i in range(M):
        w_i = None if weights is None else weights[i:i + 1, mask[i]]
        np.testing.assert_allclose(q[i, mask[i]], tilted_weights(rewards[i:i + 1, mask[i]], safety[i:i + 1, mask[i]], lam, beta, w_i)[0], atol=1e-12)
    as_torch = lambda x: None if x is None else torch.tensor(x)
    np.testing.assert_allclose(tilted_weights(as_torch(rewards), as_torch(safety), as_torch(lam), beta, as_torch(weights)),
                               tilted_weights(rewards, safety, lam, beta, weights), atol=1e-15)


def test_threshold_path_matches_cold_solves():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(50, 12)), rng.normal(size=(50, 12))
    rewards, safety = z1, -0.5 * z1 + 0.9 * z2
    grid = np.linspace(-1.0, 1.2, 8)
    for b, res in zip(grid, threshold_path(rewards, safety, grid, 0.5)):
        np.testing.assert_allclose(res.lam, solve_dual(rewards, safety, b, 0.5).lam, atol=1e-9)


@pytest.mark.parametrize('kwargs, message', [
    (dict(rewards=np.ones((2, 3)), safety=np.ones((2, 4))), '`safety` must have shape'),
    (dict(beta=-1.0), '`beta` must be a positive'),
    (dict(rewards=np.ones((0, 3)), safety=np.ones((0, 3))), 'is empty'),
    (dict(rewards=np.array([[0.0, np.nan, 1.0]] * 2)), 'NaN or inf'),
    (dict(safety=np.array([[0.0, np.inf, 1.0]] * 2)), 'NaN or inf'),
    (dict(weights=np.array([[1.0, -1.0, 1.0]] * 2)), '`weights` must be finite and >= 0'),
    (dict(mask=np.array([[True, True, True], [False, False, False]])), 'prompts [1] have no unmasked response'),
    (dict(weights=np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])), 'prompts [1] have no unmasked response'),
    (dict(mask=np.ones((3, 2), bool)), '`mask` must have shape'),
    (dict(thresholds=[0.0, 0.0]), '`thresholds` must be a number or have shape (1,)'),
    (dict(thresholds=np.nan), '`thresholds` must be finite'),
])
def test_errors_name_the_argument(kwargs, message):
    args = dict(rewards=np.array([[0.0, 1.0, 2.0]] * 2), safety=np.array([[1.0, 0.0, -1.0]] * 2), thresholds=0.0, beta=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError) as e: solve_dual(**args)
    assert message in str(e.value), str(e.value)


def test_infeasible_thresholds_state_the_largest_reachable_value():
    rewards, safety = np.array([[0.0, 1.0, 2.0]] * 2), np.array([[1.0, 0.0, -1.0], [3.0, 0.0, -1.0]])
    with pytest.raises(InfeasibleConstraintError, match='largest E\\[g_0\\] any policy on these responses attains is 2') as e:
        solve_dual(rewards, safety, 2.5, 1.0)
    np.testing.assert_allclose(e.value.reachable, [2.0])
    both = np.stack([safety, -safety], -1)
    with pytest.raises(InfeasibleConstraintError, match='not jointly reachable'): solve_dual(rewards, both, [0.5, 0.5], 1.0)
    assert solve_dual(rewards, both, [0.5, -1.0], 1.0).converged


@settings(max_examples=25)
@given(problems(max_m=1), st.floats(0.05, 0.95), st.sampled_from([-0.5, 0.05, 0.9]))
def test_joint_infeasibility_is_detected(p, u, s):
    "g_2 = -g_1: E[g_1] >= b_1 and E[g_2] >= b_2 hold together iff b_1 + b_2 <= 0, although each is reachable alone."
    rewards, safety, beta, weights, _, _ = p
    g1 = safety[..., 0]
    lo, hi = g1.min(1).mean(), g1.max(1).mean()
    b1 = lo + u * (hi - lo)
    b = np.array([b1, -b1 + s * min(u, 1 - u) * (hi - lo)])  # b_2 < max E[-g_1] = -lo: reachable alone
    both = np.stack([g1, -g1], -1)
    if s > 0:
        with pytest.raises(InfeasibleConstraintError, match='not jointly reachable'):
            solve_dual(rewards, both, b, beta, weights)
    else:
        res = solve_dual(rewards, both, b, beta, weights)
        assert res.converged and (res.expected_safety >= b - 1e-8).all()


# --- rewards on a much larger scale than the safety scores (saturated pi_0) ----------------------------------------

def _plain_safety(rewards, safety, lam, beta, weights=None):
    "E_x E_{pi_lam}[g] (m,) with a plain max-shifted softmax (none of the solver's machinery)."
    z = (rewards + safety @ np.asarray(lam, float)) / beta
    if weights is not None: z = z + np.log(weights)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    return (q[..., None] * safety).sum(1).mean(0)


def _bisect(f, hi=1.0, iters=120):
    "The root of an increasing function f on [0, inf) (f(0) < 0) by doubling then bisection."
    lo = 0.0
    while f(hi) < 0: lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _nested_bisection(rewards, safety, b, beta):
    """lam* for two active constraints without the solver: for each lam_1, lam_2(lam_1) solves dD/dlam_2 = 0 (bisection,
    increasing in lam_2); h(lam_1) = min_{lam_2} D is convex with h' = dD/dlam_1 at lam_2(lam_1), found by bisection."""
    inner = lambda l1: _bisect(lambda l2: _plain_safety(rewards, safety, [l1, l2], beta)[1] - b[1], hi=1.0, iters=80)
    l1 = _bisect(lambda l1: _plain_safety(rewards, safety, [l1, inner(l1)], beta)[0] - b[0], iters=80)
    return np.array([l1, inner(l1)])


def _scaled_problem(seed, M=30, N=12):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(M, N))
    safety = rng.normal(size=(M, N, 2)) - 0.6 * rewards[..., None]
    return rewards, safety, safety.max(1).mean(0) - 0.6


@pytest.mark.parametrize('scale', [1e3, 1e4, 1e6])
@pytest.mark.parametrize('seed', [0, 1])
def test_converges_when_rewards_dwarf_safety_one_constraint(scale, seed):
    rewards, safety, b = _scaled_problem(seed)
    res = solve_dual(scale * rewards, safety[..., :1], b[:1], 0.5, min_ess=0)
    ref = _bisect(lambda l: _plain_safety(scale * rewards, safety[..., :1], [l], 0.5)[0] - b[0])
    assert res.converged and res.lam[0] > 0
    assert np.isfinite(res.ess).all() and (res.ess >= 1 - 1e-9).all()  # rows whose weights sum below 1e-150 too
    np.testing.assert_allclose(res.lam[0], ref, rtol=1e-9)
    np.testing.assert_allclose(res.expected_safety, b[:1], atol=1e-9)


@pytest.mark.parametrize('scale', [1e3, 1e4, 1e6])
def test_converges_when_rewards_dwarf_safety_two_constraints(scale):
    rewards, safety, b = _scaled_problem(2)
    res = solve_dual(scale * rewards, safety, b, 0.5, min_ess=0)
    assert res.converged and (res.lam > 0).all()
    np.testing.assert_allclose(res.lam, _nested_bisection(scale * rewards, safety, b, 0.5), rtol=1e-7)
    np.testing.assert_allclose(_plain_safety(scale * rewards, safety, res.lam, 0.5), b, atol=1e-9)


@pytest.mark.parametrize('scale', [1e3, 1e6])
def test_scaling_identity_lam_grows_with_the_rewards(scale):
    """lam*(c r, g, b, beta) = c lam*(r, g, b, beta / c), and for large c this tends to c lam_LP: lam*/c converges.
    Weighted problems go through the same tempered phases (they rescale log w-shifted exponents)."""
    rewards, safety, b = _scaled_problem(3)
    weights = np.random.default_rng(3).dirichlet(np.ones(12), size=30)
    res = solve_dual(scale * rewards, safety, b, 0.5, weights, min_ess=0)
    same = solve_dual(rewards, safety, b, 0.5 / scale, weights, min_ess=0)
    assert res.converged and same.converged
    np.testing.assert_allclose(res.lam, scale * same.lam, rtol=1e-7)
    np.testing.assert_allclose(_plain_safety(scale * rewards, safety, res.lam, 0.5, weights), b, atol=1e-9)
    far = solve_dual(1e8 * rewards, safety, b, 0.5, weights, min_ess=0, tol=1e-8)  # 1e-10 is below the rounding of 1e8 r/beta
    assert far.converged
    np.testing.assert_allclose(res.lam / scale, far.lam / 1e8, rtol=1e-3)


@pytest.mark.parametrize('scale', [1e2, 1e3, 1e6])
def test_few_responses_with_huge_rewards_converge_or_are_infeasible_as_at_scale_one(scale):
    """20 prompts x 8 responses: pi_lam sits on single responses and the Hessian underflows to exactly 0. The feasible set
    does not depend on the rewards, so each problem must converge to its KKT point, or be infeasible, as at scale 1."""
    for seed in range(24):
        rng = np.random.default_rng(seed)
        rewards, safety = rng.normal(size=(20, 8)), rng.normal(size=(20, 8, 2))
        b = safety.mean((0, 1)) + 0.8 * (safety.max(1).mean(0) - safety.mean((0, 1)))
        try: solve_dual(rewards, safety, b, 0.5, min_ess=0)
        except InfeasibleConstraintError:
            with pytest.raises(InfeasibleConstraintError): solve_dual(scale * rewards, safety, b, 0.5, min_ess=0)
            continue
        res = solve_dual(scale * rewards, safety, b, 0.5, min_ess=0)
        grad = _plain_safety(scale * rewards, safety, res.lam, 0.5) - b
        assert res.converged and (grad >= -1e-9).all(), (seed, res)
        np.testing.assert_allclose(np.where(res.lam > 0, grad, 0.0), 0.0, atol=1e-9)


def test_warm_starts_in_saturated_problems_converge():
    "threshold_path and bootstrap_dual warm-start every solve; in a saturated problem they fall back to tempering."
    rewards, safety, b = _scaled_problem(4)
    grid = np.linspace(b[0] - 0.4, b[0], 5)
    for b0, res in zip(grid, threshold_path(1e5 * rewards, safety[..., 0], grid, 0.5, min_ess=0)):
        assert res.converged
        np.testing.assert_allclose(res.lam, solve_dual(1e5 * rewards, safety[..., 0], b0, 0.5, min_ess=0).lam, rtol=1e-8)
    boot = bootstrap_dual(1e5 * rewards, safety, b, 0.5, n_boot=10, min_ess=0)
    assert boot.result.converged and np.isfinite(boot.lam).all()


def test_unconverged_pgd_is_not_reported_converged():
    rewards, safety, b = _scaled_problem(5)
    with pytest.warns(RuntimeWarning, match='did not converge'):
        res = solve_dual(rewards, safety[..., 0], b[0], 0.5, method='pgd', lr=1e-9)
    assert not res.converged and res.expected_safety[0] < b[0] - 1e-3


# --- every bad input is refused by name ------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(method='pgd', lr=0.0), '`lr` must be a finite number > 0'),
    (dict(method='pgd', lr=-1.0), '`lr` must be a finite number > 0'),
    (dict(lr=np.inf), '`lr` must be a finite number > 0'),
    (dict(lr='fast'), '`lr` must be a finite number > 0'),
    (dict(max_iter=-5), '`max_iter` must be an integer >= 1'),
    (dict(max_iter=0), '`max_iter` must be an integer >= 1'),
    (dict(max_iter=2.5), '`max_iter` must be an integer >= 1'),
    (dict(max_iter=True), '`max_iter` must be an integer >= 1'),
    (dict(tol=-1.0), '`tol` must be a finite number > 0'),
    (dict(tol=0.0), '`tol` must be a finite number > 0'),
    (dict(tol=np.nan), '`tol` must be a finite number > 0'),
    (dict(tol=np.inf), '`tol` must be a finite number > 0'),
    (dict(rewards=np.array([[0.0, 1.0, 2.0]] * 2) + 1j), '`rewards` must be real'),
    (dict(safety=torch.ones(2, 3, dtype=torch.complex64)), '`safety` must be real'),
    (dict(thresholds=None), "None means 'unconstrained' only in MoCAN/PeCAN"),
    (dict(lam0=[-1.0]), '`lam0` must be finite and >= 0'),
    (dict(method='adam'), "`method` must be 'newton' or 'pgd'"),
])
def test_solver_settings_are_refused_by_name(kwargs, message):
    args = dict(rewards=np.array([[0.0, 1.0, 2.0]] * 2), safety=np.array([[1.0, 0.0, -1.0]] * 2), thresholds=0.0, beta=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError) as e: solve_dual(**args)
    assert message in str(e.value), str(e.value)


def test_nan_positions_in_the_callers_order():
    rewards, safety = np.zeros((4, 6)), np.zeros((4, 6, 2))
    safety[3, 5, 0] = np.nan
    with pytest.raises(ValueError, match=r'`safety` has NaN or inf at index \(3, 5, 0\)'): solve_dual(rewards, safety, -1.0, 1.0)
    mask = np.ones((4, 6), bool); mask[0, 0] = False
    with pytest.raises(ValueError, match=r'`safety` has NaN or inf at index \(3, 5, 0\)'):
        solve_dual(rewards, safety, -1.0, 1.0, mask=mask)
    safety[3, 5, 0], safety[1, 0, 1] = 0.0, np.inf
    with pytest.raises(ValueError, match=r'at index \(1, 0, 1\)'): solve_dual(rewards, safety, -1.0, 1.0)


@pytest.mark.parametrize('n_boot', [0, -3, 2.5, '10', None])
def test_bootstrap_refuses_bad_n_boot(n_boot):
    rewards, safety, b = _scaled_problem(0)
    with pytest.raises(ValueError, match='`n_boot` must be an integer >= 1'):
        bootstrap_dual(rewards, safety[..., 0], b[0], 0.5, n_boot=n_boot)


def _preference_inputs(rng, M=5, N=6, m=2):
    ref_logps = np.log(rng.dirichlet(np.ones(N), size=M))
    return ref_logps, ref_logps + 0.1 * rng.normal(size=(M, N)), ref_logps[..., None] + 0.1 * rng.normal(size=(M, N, m))


@pytest.mark.parametrize('which, index, value', [('ref_logps', (1, 2), np.nan), ('helpful_logps', (0, 3), np.inf),
                                                 ('safety_logps', (4, 1, 1), -np.inf), ('safety_logps', (2, 0, 0), np.nan)])
def test_preference_errors_name_the_log_probs(which, index, value):
    inputs = dict(zip(['ref_logps', 'helpful_logps', 'safety_logps'], _preference_inputs(np.random.default_rng(0))))
    inputs[which][index] = value
    with pytest.raises(ValueError, match=f'`{which}` has NaN or inf at index {re.escape(str(index))}'):
        solve_dual_preference(**inputs, margins=0.0, beta=0.5)
    mask = np.ones((5, 6), bool); mask[index[:2]] = False
    assert solve_dual_preference(**inputs, margins=0.0, beta=0.5, mask=mask).converged


@pytest.mark.parametrize('kwargs, message', [(dict(beta_g=[0.5, 1.0, 2.0]), '`beta_g` must be a number or have shape (2,)'),
                                             (dict(beta_g=[0.5, -1.0]), '`beta_g` must be positive'),
                                             (dict(beta_r='x'), '`beta_r` must be a finite number > 0'),
                                             (dict(beta_r=0.0), '`beta_r` must be a finite number > 0'),
                                             (dict(beta_g='x'), '`beta_g` must be a numeric array')])
def test_preference_coefficients_are_checked(kwargs, message):
    ref_logps, helpful_logps, safety_logps = _preference_inputs(np.random.default_rng(1))
    with pytest.raises(ValueError) as e: solve_dual_preference(ref_logps, helpful_logps, safety_logps, 0.0, 0.5, **kwargs)
    assert message in str(e.value), str(e.value)


@given(problems(), st.sampled_from([1e300, 1e308]), st.booleans())
def test_tilted_weights_stay_finite_for_huge_multipliers(p, huge, masked):
    "lam / beta beyond the float range: the limit policy, on each prompt's maximizers of lam.g, rows summing to 1."
    rewards, safety, beta, weights, lam, rng = p
    lam = huge * (lam / lam.max())
    mask = None
    if masked:
        mask = rng.random(rewards.shape) < 0.7
        mask[:, 0] = True
    with np.errstate(invalid='raise'): q = tilted_weights(rewards, safety, lam, beta, weights, mask)
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    u = np.where(True if mask is None else mask, safety @ (lam / lam.max()), -np.inf)
    best = np.isclose(u, u.max(1, keepdims=True), rtol=0, atol=1e-9)
    assert (q[~best] < 1e-12).all()
    w = (np.ones(q.shape) if weights is None else weights) * (True if mask is None else mask)
    w = w / w.sum(1, keepdims=True)  # pi_ref on the support
    kl = (q * np.log(np.where(q > 0, q / np.where(q > 0, w, 1.0), 1.0))).sum(1).mean()
    np.testing.assert_allclose(policy_metrics(rewards, safety, lam, beta, weights, mask)['kl'], kl, atol=1e-9)


def test_slack_constraint_in_a_saturated_problem_costs_one_evaluation():
    rewards, safety, _ = _scaled_problem(6)
    res = solve_dual(1e6 * rewards, safety, [-5.0, -5.0], 0.5, min_ess=0)
    assert res.converged and res.evaluations == 1 and (res.lam == 0).all()
