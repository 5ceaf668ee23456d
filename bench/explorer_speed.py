"""Latency of `ThresholdExplorer` slider updates at 1000 prompts x 128 responses, against cold `solve_dual`.

A slider change runs the fast path (warm-started `solve_dual` + delta-method intervals + labels); the plots are
redrawn later, when the sliders rest. The benchmark runs inside an asyncio event loop, as a Jupyter kernel does,
so the plots are deferred exactly as in a notebook. Moves are drags (small steps, about 3 in 4), jumps and, one in
20, a jump past the feasible edge; each is timed from `slider.value = b` to the updated labels. The peer is a cold
`solve_dual` (no warm start, no intervals) at the same thresholds, interleaved move by move.

    python bench/explorer_speed.py [--M 1000] [--N 128] [--moves 200] [--m 1 2]
"""
import argparse, asyncio, time, warnings
import numpy as np
from safe_dual.dual import solve_dual
from safe_dual.explore import ThresholdExplorer

def scores(M, N, m, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(M, N)) + 0.5 * rng.normal(size=(M, 1))
    safety = rng.normal(size=(M, N, m)) - 0.6 * rewards[..., None] + 0.3 * rng.normal(size=(M, 1, m))
    return rewards, safety

def pct(xs): return f'median {np.median(xs):6.1f} ms  p95 {np.percentile(xs, 95):6.1f} ms  max {np.max(xs):6.1f} ms'

async def run(M, N, m, moves, beta=0.5, seed=0):
    rewards, safety = scores(M, N, m, seed)
    ex = ThresholdExplorer(rewards, safety, beta=beta, plot_delay=0.05)
    await asyncio.sleep(0.1)  # let the first deferred plot run
    rng = np.random.default_rng(seed + 1)
    # drags and jumps stay between pi_ref's safety and 60% of the way to the edge, where m = 2 is jointly feasible
    lo, hi = ex.reference['safety'], ex.reference['safety'] + 0.6 * (ex.reference['reach'] - ex.reference['safety'])
    fast, cold, infeasible = [], [], 0
    for i in range(moves):
        k = rng.integers(m)
        s = ex.sliders[k]
        if i % 20 == 0: b = rng.uniform(ex.reference['reach'][k], s.max)      # a jump past the feasible edge
        elif i % 4 == 0 or i % 20 == 1: b = rng.uniform(lo[k], hi[k])         # a jump (back inside)
        else: b = np.clip(s.value + rng.normal(0, 0.01 * (hi[k] - lo[k])), lo[k], hi[k])  # a drag step
        b = float(b)
        start = time.perf_counter()
        s.value = b                      # the observer runs the fast path synchronously
        fast.append(1000 * (time.perf_counter() - start))
        infeasible += ex.result is None
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                want = solve_dual(rewards, safety, ex.thresholds, beta)
        except ValueError: want = None  # past the edge: the explorer shows a message instead
        cold.append(1000 * (time.perf_counter() - start))
        assert (want is None) == (ex.result is None)
        if want is not None: assert np.allclose(ex.result.lam, want.lam, rtol=1e-6, atol=1e-8), (ex.result.lam, want.lam)
    # slow path: a redraw with the cached path (threshold moved along it), then a new path (beta moved)
    redraw, sweep = [], []
    ex.update_plots()  # the path for the current beta and other thresholds is cached from here on
    for i in range(3):
        ex.sliders[0].value = float(lo[0] + (0.2 + 0.2 * i) * (hi[0] - lo[0]))
        start = time.perf_counter(); ex.update_plots(); redraw.append(1000 * (time.perf_counter() - start))
        ex.beta_slider.value = beta * (1.5 + i)
        start = time.perf_counter(); ex.update_plots(); sweep.append(1000 * (time.perf_counter() - start))
    return fast, cold, infeasible, redraw, sweep

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--M', type=int, default=1000); p.add_argument('--N', type=int, default=128)
    p.add_argument('--moves', type=int, default=200); p.add_argument('--m', type=int, nargs='+', default=[1, 2])
    a = p.parse_args()
    for m in a.m:
        fast, cold, infeasible, redraw, sweep = asyncio.run(run(a.M, a.N, m, a.moves))
        print(f'M={a.M} N={a.N} m={m}: {a.moves} slider moves ({infeasible} past the edge)')
        print(f'  explorer update (warm solve + intervals + labels): {pct(fast)}')
        print(f'  peer: cold solve_dual only:                        {pct(cold)}')
        print(f'  ratio explorer/cold (medians): {np.median(fast) / np.median(cold):.2f}; '
              f'under 100 ms: {np.mean(np.array(fast) < 100):.1%}')
        print(f'  slow path: redraw with cached path {pct(redraw)}; new path (beta moved) {pct(sweep)}')

if __name__ == '__main__': main()
