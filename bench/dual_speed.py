"""Speed of `solve_dual` (projected Newton) against the authors' published dual solver.

Problem: 1000 prompts x 128 responses with correlated, conflicting synthetic scores (helpful responses tend to be
less safe), beta = 0.1, and 9 thresholds from inactive (lam* = 0) to near the feasible edge (1% of the way from
E_{pi_0}[g] to the largest reachable value short of it). The two solvers alternate sweeps over the thresholds in one
run, on the same inputs; every `lam` is checked against a high-precision reference (bisection on the monotone 1-D
gradient with an independent log-sum-exp). Times are CPU times of this thread (the machine is shared; wall times are printed too) and are also
given in units of one `np.exp` pass over the (M, N) array, measured between the solves.
With `--reward-scale c` the rewards are multiplied by c (e.g. 1e3 or 1e6: rewards far larger than the safety scores,
where pi_0 is saturated and `solve_dual` starts by tempering the rewards).
Run: `python bench/dual_speed.py [--beta 0.1] [--repeats 3] [--reward-scale 1]`.
"""
import argparse, time, warnings
import numpy as np
from safe_dual.dual import solve_dual

M, N, SEED = 1000, 128, 0

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

def timed(f, *args, **kwargs):
    "(result, CPU seconds of this thread, wall seconds)."
    cpu, wall = time.thread_time(), time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.thread_time() - cpu, time.perf_counter() - wall

def exp_pass(x, repeats=5):
    "Median (CPU, wall) seconds of one np.exp pass over `x` into a preallocated array."
    out = np.empty_like(x)
    return np.median([timed(np.exp, x, out=out)[1:] for _ in range(repeats)], axis=0)

def main(beta=0.1, repeats=3, reward_scale=1.0):
    rewards, safety = make_scores()
    rewards = reward_scale * rewards
    e0, reach = tilted_mean(rewards, safety, 0.0, beta), safety.max(1).mean()
    thresholds = np.concatenate([[e0 - 0.1], np.linspace(e0, reach, 9)[1:-1], [reach - 0.01 * (reach - e0)]])
    refs = [reference_lam(rewards, safety, b, beta) for b in thresholds]
    ours, theirs, exp_t = np.zeros((repeats, 9, 2)), np.zeros((repeats, 9, 2)), []
    warnings.simplefilter('ignore', UserWarning)  # low-ESS warnings near the edge are expected here
    print(f"M={M} N={N} beta={beta} reward scale={reward_scale:g}: E_pi0[g]={e0:.4f}, largest reachable E[g]={reach:.4f}")
    for rep in range(repeats):  # the two solvers alternate sweeps over the 9 thresholds
        exp_t.append(exp_pass(safety))
        results = []
        for k, b in enumerate(thresholds):
            res, *ours[rep, k] = timed(solve_dual, rewards, safety, b, beta)
            assert res.converged and abs(res.lam[0] - refs[k]) <= 1e-6 * max(1, refs[k]), (b, res.lam, refs[k])
            results.append(res)
        exp_t.append(exp_pass(safety))
        for k, b in enumerate(thresholds):
            (lam_a, ok_a), *theirs[rep, k] = timed(authors_solver, rewards, safety, b, beta)
            if rep == 0:
                print(f"b={b:+.4f} lam*={refs[k]:.10f} | newton |lam-ref|={abs(results[k].lam[0] - refs[k]):.1e} "
                      f"evaluations={results[k].evaluations} {ours[rep, k, 0] * 1e3:5.1f} ms | authors |lam-ref|="
                      f"{abs(lam_a - refs[k]):.1e} converged={ok_a!s:5} {theirs[rep, k, 0] * 1e3:6.0f} ms")
    exp_cpu, exp_wall = np.median(exp_t, axis=0)
    (ours_cpu, ours_wall), (theirs_cpu, theirs_wall) = np.median(ours.sum(1), 0), np.median(theirs.sum(1), 0)
    print(f"one np.exp pass over ({M}, {N}): {exp_cpu * 1e6:.0f} us CPU ({exp_wall * 1e6:.0f} us wall)")
    print(f"total over 9 thresholds (median of {repeats} interleaved repeats), CPU: newton {ours_cpu * 1e3:.1f} ms, "
          f"authors {theirs_cpu * 1e3:.0f} ms -> {theirs_cpu / ours_cpu:.0f}x faster; wall: {ours_wall * 1e3:.1f} ms "
          f"vs {theirs_wall * 1e3:.0f} ms -> {theirs_wall / ours_wall:.0f}x")
    print(f"per solve: newton {ours_cpu / 9 * 1e3:.2f} ms = {ours_cpu / 9 / exp_cpu:.1f} exp passes "
          f"(wall {ours_wall / 9 / exp_wall:.1f}); authors {theirs_cpu / 9 * 1e3:.0f} ms = {theirs_cpu / 9 / exp_cpu:.0f} exp passes")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--beta', type=float, default=0.1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--reward-scale', type=float, default=1.0)
    main(**vars(parser.parse_args()))
