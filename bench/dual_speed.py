"""Speed of `solve_dual` (projected Newton) against the authors' published dual solver.

Problem: 1000 prompts x 128 responses with correlated, conflicting synthetic scores (helpful responses tend to be
less safe), beta = 0.1, and 9 thresholds from inactive (lam* = 0) to near the feasible edge. Both solvers run
interleaved on the same inputs; each `lam` is checked against a high-precision reference (bisection on the
monotone 1-D gradient with an independent log-sum-exp). Times are also given in units of one `np.exp` pass over
the (M, N) array. Run: `python bench/dual_speed.py`.
"""
import time, warnings
import numpy as np
from safe_dual.dual import solve_dual

M, N, BETA, SEED, REPEATS = 1000, 128, 0.1, 0, 3

def make_scores(seed=SEED):
    "Rewards and safety scores, correlated -0.6 within prompts, with per-prompt offsets."
    rng = np.random.default_rng(seed)
    z1, z2, offset = rng.standard_normal((M, N)), rng.standard_normal((M, N)), rng.standard_normal((M, 1))
    return z1 + 0.5 * offset, -0.6 * z1 + 0.8 * z2 - 0.3 * offset

def tilted_mean(rewards, safety, lam, beta):
    "E_x E_{pi_lam}[g] with a plain softmax over responses (independent of safe_dual)."
    z = (rewards + lam * safety) / beta
    e = np.exp(z - z.max(1, keepdims=True))
    return ((e * safety).sum(1) / e.sum(1)).mean()

def reference_lam(rewards, safety, b, beta):
    "lam* by bisection on the increasing gradient E_{pi_lam}[g] - b, to relative width 1e-15."
    if tilted_mean(rewards, safety, 0.0, beta) >= b: return 0.0
    lo, hi = 0.0, 1.0
    while tilted_mean(rewards, safety, hi, beta) < b: lo, hi = hi, 2 * hi
    while hi - lo > 1e-15 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tilted_mean(rewards, safety, mid, beta) < b else (lo, mid)
    return (lo + hi) / 2

def authors_solver(rewards, safety, b, beta, lr=1.0, max_iter=200, restarts=5, window=5, atol=1e-5):
    """The published solver: projected gradient on a scalar lam with step 2*lr, at most `max_iter` iterations,
    stop when the last `window` iterates differ by < `atol`, else restart from 0 with the step halved (up to
    `restarts` times); a full softmax over every prompt's responses in each iteration."""
    step = 2 * lr
    for _ in range(restarts + 1):
        lam, history = 0.0, []
        for _ in range(max_iter):
            z = (rewards + lam * safety) / beta
            z -= z.max(1, keepdims=True)
            e = np.exp(z)
            grad = ((e * safety).sum(1) / e.sum(1)).mean() - b
            lam = max(0.0, lam - step * grad)
            history.append(lam)
            if len(history) >= window and max(history[-window:]) - min(history[-window:]) < atol: return lam, True
        step /= 2
    return lam, False

def exp_pass_seconds(x, repeats=5):
    "Median time of `repeats` passes of np.exp over `x` into a preallocated array."
    out, times = np.empty_like(x), []
    for _ in range(repeats):
        t = time.perf_counter(); np.exp(x, out=out); times.append(time.perf_counter() - t)
    return float(np.median(times))

def main():
    rewards, safety = make_scores()
    e0 = tilted_mean(rewards, safety, 0.0, BETA)
    reach = safety.max(1).mean()
    thresholds = np.concatenate([[e0 - 0.1], np.linspace(e0, reach, 9)[1:-1], [reach - 0.01 * (reach - e0)]])
    refs = [reference_lam(rewards, safety, b, BETA) for b in thresholds]
    ours_t, theirs_t, exp_t = np.zeros((REPEATS, 9)), np.zeros((REPEATS, 9)), []
    warnings.simplefilter('ignore', UserWarning)  # ESS warnings near the edge are expected here
    for rep in range(REPEATS):
        for k, b in enumerate(thresholds):
            exp_t.append(exp_pass_seconds(rewards))
            t = time.perf_counter(); res = solve_dual(rewards, safety, b, BETA); ours_t[rep, k] = time.perf_counter() - t
            t = time.perf_counter(); lam_a, ok_a = authors_solver(rewards, safety, b, BETA); theirs_t[rep, k] = time.perf_counter() - t
            if rep == 0:
                print(f"b={b:+.4f}  lam*={refs[k]:.10f}  newton: |dlam|={abs(res.lam[0] - refs[k]):.1e} "
                      f"evals={res.evaluations:2d} {ours_t[rep, k] * 1e3:6.1f} ms   authors: |dlam|={abs(lam_a - refs[k]):.1e} "
                      f"converged={ok_a} {theirs_t[rep, k] * 1e3:7.1f} ms")
                assert res.converged and abs(res.lam[0] - refs[k]) <= 1e-6, (b, res.lam, refs[k])
    exp_s = float(np.median(exp_t))
    ours, theirs = np.median(ours_t.sum(1)), np.median(theirs_t.sum(1))
    print(f"one np.exp pass over ({M}, {N}) (median, measured between the solves): {exp_s * 1e6:.0f} us")
    print(f"total over 9 thresholds (median of {REPEATS} interleaved repeats): newton {ours * 1e3:.1f} ms, "
          f"authors {theirs * 1e3:.0f} ms -> speed ratio {theirs / ours:.0f}x")
    print(f"per solve: newton {ours / 9 * 1e3:.2f} ms = {ours / 9 / exp_s:.1f} exp passes; "
          f"authors {theirs / 9 * 1e3:.0f} ms = {theirs / 9 / exp_s:.0f} exp passes")

if __name__ == "__main__": main()
