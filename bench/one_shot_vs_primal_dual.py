"""One-shot MoCAN against the primal-dual methods it replaces, on the toy world, every policy scored exactly.

    python bench/one_shot_vs_primal_dual.py              # full size: m = 1 and 2, three thresholds each, 5 seeds
    python bench/one_shot_vs_primal_dual.py --small      # CI's slow stage (a few minutes on 2 cores)
    python bench/one_shot_vs_primal_dual.py --sweep      # the step-size sweep behind the settings below

Methods (`safe_dual.baselines`): one-shot MoCAN (the `MoCAN` pipeline) and its CAID-style refinement (k rounds,
continuing the same run), iterative primal-dual with a DPO-style step (warm start and restart), Safe-RLHF's
PPO-Lagrangian, SACPO. Per seed, every (m, thresholds) setting runs every method, in an order rotated by the seed
(machines are noisy), on one CPU thread. Writes `<out>/<size>.json` (every run's records and summary) and prints the
table; `nbs/17_baselines.ipynb` reads the file back for its table and plots.
Every finished run is appended to `<out>/<size>.runs.jsonl` as it ends, so a killed benchmark resumes where it stopped
(runs of other settings in that file are ignored, not reused).
"""
import argparse, hashlib, json, logging, os, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch

from safe_dual.refine import ComputeMeter, refine
from safe_dual.baselines import ppo_lagrangian, primal_dual_dpo, run_summary, sacpo
from safe_dual.dual import solve_dual
from safe_dual.mocan import MoCAN
from safe_dual.runs import jsonable
from safe_dual.evaluate import safety_spread
from safe_dual.toy import exact_policy, load_toy_world, one_thread

BETA = 1.0
# thresholds from barely to strongly active (unconstrained pi_lam=0: E[g1] = -0.381, E[g2] = -0.705; pi_ref: -0.284, -0.484)
THRESHOLDS = {1: [(-0.35,), (-0.25,), (-0.15,)], 2: [(-0.35, -0.65), (-0.25, -0.4), (-0.15, -0.25)]}
# the package's toy training settings (mocan.TOY_TRAIN_ARGS) without per-epoch checkpoints
TRAIN = dict(loss_type="listwise", use_lora=False, learning_rate=3e-3, num_train_epochs=40, per_device_train_batch_size=4,
             logging_steps=10_000)
# step sizes at their best in `--small --sweep` (m = 1, b = -0.25, seeds 0-1, written to <out>/sweep.json): no setting
# reached the tolerance at that size, so "best" is the smallest final constraint error, averaged over the two seeds:
#   primal-dual (warm) eta in {1, 2, 4}: 0.035, 0.026, 0.053 -> 2
#   PPO-Lagrangian lr x lambda_lr in {1e-3, 3e-3} x {0.1 (Safe-RLHF's default), 0.5}: 0.060, 0.017, 0.087, 0.066 -> 1e-3, 0.5
PD_ETA, PPO_LR, PPO_LAMBDA_LR = 2.0, 1e-3, 0.5
SIZES = {
    "full": dict(seeds=5, ms=(1, 2), n_samples=128, epochs=40, refine_epochs=20, refine_rounds=2, pd_rounds=8,
                 pd_warm_epochs=10, pd_restart_rounds=4, n_estimate=64, ppo_steps=800, ppo_eval_every=50,
                 sacpo_grid={1: (0.125, 0.25, 0.5, 1.0), 2: (0.25, 0.5)}, settings=(0, 1, 2)),
    "small": dict(seeds=2, ms=(1, 2), n_samples=32, epochs=8, refine_epochs=4, refine_rounds=2, pd_rounds=3,
                  pd_warm_epochs=3, pd_restart_rounds=2, n_estimate=32, ppo_steps=60, ppo_eval_every=20,
                  sacpo_grid={1: (0.25, 0.5), 2: (0.25, 0.5)}, settings=(1,)),
}
METHODS = ("mocan", "pd-warm", "pd-restart", "ppo-lag", "sacpo")


def evaluator(world, m, optimum_probs):
    "Exact reward, first m safety scores, KL to pi_ref and KL to the exact optimum of a model."
    def evaluate(model):
        p = exact_policy(model, world)
        out = world.metrics_of(p)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (np.log(p) - np.log(optimum_probs)), 0.0).sum(1).mean()
        return dict(reward=out["reward"], safety=out["safety"][:m], kl=out["kl"], kl_to_optimum=float(kl))
    return evaluate


def run_method(name, world, m, b, seed, size, pd_eta=PD_ETA, ppo_lr=PPO_LR, ppo_lambda_lr=PPO_LAMBDA_LR, ppo_lambda_max=None):
    "One run of one method; returns {method name: records} (MoCAN's run also yields its refinement)."
    optimum = solve_dual(world.rewards, world.safety[..., :m], b, BETA, weights=world.ref_probs, min_ess=0.0, return_weights=True)
    ev = evaluator(world, m, optimum.weights)
    scorers = dict(reward=world.reward_scorer, safety=world.safety_scorers[:m])
    common = dict(max_new_tokens=world.max_new_tokens, batch_size=256, seed=seed)
    train = dict(TRAIN, num_train_epochs=size["epochs"])
    policy = world.new_model()
    if name == "mocan":
        with tempfile.TemporaryDirectory() as d:
            start = time.perf_counter()
            mo = MoCAN(policy, world.tokenizer, world.prompts, scorers, b, BETA, n_samples=size["n_samples"], output_dir=d,
                       max_new_tokens=world.max_new_tokens, batch_size=256, seed=seed, train_args=dict(train, save_strategy="no"),
                       bootstrap=0)
            model, lam = mo.train(), np.asarray(mo.dual()["lam"])
            steps = mo.run_folder.result("train")["log"][-1]["step"]
            meter = ComputeMeter(ev, samples=len(mo.collect()), grad_steps=steps, wall=time.perf_counter() - start)
            meter.record(model, lam, round=0)
            out = refine(model, world.tokenizer, world.prompts, scorers, mo.collect(), lam, b, BETA, rounds=size["refine_rounds"],
                         n_estimate=size["n_estimate"], train_args=dict(train, num_train_epochs=size["refine_epochs"]),
                         evaluator=ev, meter=meter, **common)
        return {"mocan (one-shot)": out["records"][:1], "mocan + refine": out["records"]}
    if name in ("pd-warm", "pd-restart"):
        warm = name == "pd-warm"
        out = primal_dual_dpo(policy, world.tokenizer, world.prompts, scorers, b, BETA, eta=pd_eta, warm_start=warm,
                              rounds=size["pd_rounds"] if warm else size["pd_restart_rounds"], n_samples=size["n_samples"],
                              n_estimate=size["n_estimate"], evaluator=ev,
                              train_args=dict(train, num_train_epochs=size["pd_warm_epochs"]) if warm else train, **common)
    elif name == "ppo-lag":
        out = ppo_lagrangian(policy, world.tokenizer, world.prompts, scorers, b, BETA, steps=size["ppo_steps"], lr=ppo_lr,
                             lambda_lr=ppo_lambda_lr, lambda_max=ppo_lambda_max, eval_every=size["ppo_eval_every"], evaluator=ev,
                             **common)
    elif name == "sacpo":
        out = sacpo(policy, world.tokenizer, world.prompts, scorers, b, BETA, grid=size["sacpo_grid"][m], n_samples=size["n_samples"],
                    n_estimate=size["n_estimate"], train_args=train, evaluator=ev, **common)
    return {name: out["records"]}


def setting_info(world, m, b):
    "Exact optimum and tolerances of one (m, thresholds) setting."
    opt = solve_dual(world.rewards, world.safety[..., :m], b, BETA, weights=world.ref_probs, min_ess=0.0)
    return dict(m=m, thresholds=list(b), lam_star=opt.lam.tolist(), optimum=dict(reward=opt.expected_reward, kl=opt.kl),
                safety_tol=(0.05 * safety_spread(world.safety[..., :m], world.ref_probs)).tolist(),
                reward_tol=float(0.05 * safety_spread(world.rewards[..., None], world.ref_probs)[0]))


def summarize(runs):
    "Per (setting, method): seeds reached, median cost to tolerance, mean and std of the final errors; ratios to one-shot."
    rows = {}
    for r in runs:
        rows.setdefault((r["setting"], r["method"]), []).append(r)
    table = []
    for (setting, method), rs in rows.items():
        reached = [r["summary"]["reached"] for r in rs if r["summary"]["reached"] is not None]
        med = lambda k: float(np.median([c[k] for c in reached])) if reached else None
        stat = lambda k: (float(np.mean([r["summary"][k] for r in rs])), float(np.std([r["summary"][k] for r in rs])))
        table.append(dict(setting=setting, method=method, seeds=len(rs), reached=len(reached), wall_to_tol=med("wall"),
                          diverged=sum(bool(r["summary"].get("diverged")) for r in rs),
                          samples_to_tol=med("samples"), steps_to_tol=med("grad_steps"),
                          total_wall=float(np.mean([r["summary"]["total"]["wall"] for r in rs])),
                          constraint_error=stat("constraint_error"), reward_gap=stat("reward_gap"), kl_to_optimum=stat("kl_to_optimum")))
    return table


def format_table(table):
    "The table as aligned text."
    head = f"{'setting':<22}{'method':<18}{'reach':>6}{'wall→tol':>10}{'samples':>9}{'steps':>7}{'wall':>8}" \
           f"{'|g-b| mean±sd':>17}{'r-r* mean±sd':>17}{'KL(pi||pi*)':>13}{'diverged':>10}"
    fmt = lambda x, f: format("-", ">" + f.split(".")[0]) if x is None else format(x, f)
    lines = [head]
    for t in table:
        lines.append(f"{t['setting']:<22}{t['method']:<18}{t['reached']:>3}/{t['seeds']:<2}{fmt(t['wall_to_tol'], '10.1f')}"
                     f"{fmt(t['samples_to_tol'], '9.0f')}{fmt(t['steps_to_tol'], '7.0f')}{t['total_wall']:8.1f}"
                     f"{t['constraint_error'][0]:9.4f}±{t['constraint_error'][1]:<7.4f}{t['reward_gap'][0]:9.4f}±{t['reward_gap'][1]:<7.4f}"
                     f"{t['kl_to_optimum'][0]:9.4f}{t.get('diverged', 0):>10}")
    return "\n".join(lines)


def wall_ratios(runs, baselines=("pd-warm", "pd-restart", "ppo-lag", "sacpo")):
    "Per setting and seed: wall time to tolerance of each primal-dual method over one-shot MoCAN's (None if either never reached)."
    by = {(r["setting"], r["seed"], r["method"]): r["summary"]["reached"] for r in runs}
    out = {}
    for (setting, seed, method), reached in by.items():
        if method not in baselines: continue
        one_shot = by.get((setting, seed, "mocan (one-shot)"))
        out.setdefault(setting, {}).setdefault(method, []).append(
            None if reached is None or one_shot is None else reached["wall"] / one_shot["wall"])
    return out


def goals(result, baselines=("pd-warm", "pd-restart", "ppo-lag", "sacpo")):
    "The issue's two goals per setting: one-shot vs the best primal-dual method, and what refinement buys at what cost."
    out = {}
    for setting in result["settings"]:
        rows = {t["method"]: t for t in result["table"] if t["setting"] == setting}
        runs = {}
        for r in result["runs"]:
            if r["setting"] == setting: runs.setdefault(r["method"], []).append(r)
        reached = [m for m in baselines if m in rows and rows[m]["wall_to_tol"] is not None]
        best = min(reached, key=lambda m: rows[m]["wall_to_tol"]) if reached else None
        one = rows.get("mocan (one-shot)")
        spread = lambda m: float(np.std([r["summary"]["constraint_error"] for r in runs[m]]))
        g = dict(best_primal_dual=best, one_shot_reached=f"{one['reached']}/{one['seeds']}" if one else None)
        if best and one and one["wall_to_tol"] is not None:
            g["wall_ratio_best_over_one_shot"] = rows[best]["wall_to_tol"] / one["wall_to_tol"]
            g["one_shot_3x_faster"] = g["wall_ratio_best_over_one_shot"] >= 3
        if best and one:
            g["constraint_error_sd"] = dict(one_shot=spread("mocan (one-shot)"), best=spread(best))
            g["smaller_spread"] = g["constraint_error_sd"]["one_shot"] < g["constraint_error_sd"]["best"]
        if one and "mocan + refine" in rows:
            ref = rows["mocan + refine"]
            g["refine"] = dict(error_one_shot=one["constraint_error"][0], error_refined=ref["constraint_error"][0],
                               cost_ratio=ref["total_wall"] / one["total_wall"])
            g["refine"]["halves_error_at_2x"] = bool(g["refine"]["error_refined"] <= 0.5 * g["refine"]["error_one_shot"]
                                                     and g["refine"]["cost_ratio"] <= 2)
        out[setting] = g
    return out


def benchmark(size_name, out_dir, methods=METHODS, overrides=None, file_name=None, **step_sizes):
    "Run every method on every setting and seed of a size (with `overrides` of its entries); write and return the results."
    size, world, file_name = dict(SIZES[size_name], **(overrides or {})), load_toy_world(), file_name or size_name
    settings = [(m, THRESHOLDS[m][k]) for m in size["ms"] for k in size["settings"]]
    info = {f"m={m} b={list(b)}": setting_info(world, m, b) for m, b in settings}
    config = dict(size, beta=BETA, train=TRAIN, pd_eta=PD_ETA, ppo_lr=PPO_LR, ppo_lambda_lr=PPO_LAMBDA_LR, **step_sizes)
    fingerprint = hashlib.sha256(json.dumps(jsonable({k: v for k, v in config.items() if k not in ("seeds", "ms", "settings")}),
                                            sort_keys=True).encode()).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = out_dir / f"{file_name}.runs.jsonl"
    done = {}  # (setting, seed, method name) -> its runs, from the journal of an earlier, killed benchmark
    for line in (journal.read_text().splitlines() if journal.exists() else []):
        try: entry = json.loads(line)
        except json.JSONDecodeError: continue  # a line cut short by the kill
        if entry.get("config") == fingerprint: done[entry["setting"], entry["seed"], entry["name"]] = entry["runs"]
    runs, start = [], time.perf_counter()
    with one_thread(torch.device("cpu")):
        for seed in range(size["seeds"]):
            for m, b in settings:
                key = f"m={m} b={list(b)}"
                order = methods[seed % len(methods):] + methods[:seed % len(methods)]  # interleaved, rotated per seed
                for name in order:
                    if (key, seed, name) in done:
                        runs += done[key, seed, name]
                        print(f"[bench] {key} seed {seed} {name}: reused from {journal.name}", flush=True)
                        continue
                    new = []
                    for method, records in run_method(name, world, m, b, seed, size, **step_sizes).items():
                        s = info[key]
                        summary = run_summary(records, b, s["optimum"]["reward"], s["safety_tol"], s["reward_tol"])
                        summary["diverged"] = bool(records[-1].get("diverged", False))
                        new.append(jsonable(dict(setting=key, method=method, seed=seed, thresholds=list(b), records=records, summary=summary)))
                        print(f"[bench] {key} seed {seed} {method}: reached {summary['reached']}, |g-b| = "
                              f"{summary['constraint_error']:.4f}, r-r* = {summary['reward_gap']:+.4f}"
                              f"{' (diverged)' if summary['diverged'] else ''} ({time.perf_counter() - start:.0f} s)", flush=True)
                    runs += new
                    with open(journal, "a") as f:
                        f.write(json.dumps(dict(config=fingerprint, setting=key, seed=seed, name=name, runs=new)) + "\n")
                        f.flush(); os.fsync(f.fileno())
    result = jsonable(dict(size=size_name, config=config, settings=info, runs=runs, table=summarize(runs), ratios=wall_ratios(runs),
                            seconds=time.perf_counter() - start))
    result["goals"] = jsonable(goals(result))
    (out_dir / f"{file_name}.json").write_text(json.dumps(result, indent=1))
    return result


def sweep(size_name, out_dir):
    "The documented step-size sweep: primal-dual eta and PPO-Lagrangian (lr, lambda_lr), m = 1, middle threshold, two seeds."
    size, world, rows = dict(SIZES[size_name]), load_toy_world(), []
    b = THRESHOLDS[1][1]
    s = setting_info(world, 1, b)
    grid = [("pd-warm", dict(pd_eta=eta)) for eta in (1.0, 2.0, 4.0)] + \
           [("ppo-lag", dict(ppo_lr=lr, ppo_lambda_lr=llr)) for lr in (1e-3, 3e-3) for llr in (0.1, 0.5)]
    with one_thread(torch.device("cpu")):
        for seed in (0, 1):
            for name, kw in grid:
                for method, records in run_method(name, world, 1, b, seed, size, **kw).items():
                    summary = run_summary(records, b, s["optimum"]["reward"], s["safety_tol"], s["reward_tol"])
                    rows.append(dict(method=method, seed=seed, **kw, summary=summary))
                    print(f"[sweep] {method} {kw} seed {seed}: {summary}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(jsonable(dict(size=size_name, rows=rows)), indent=1))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="the reduced size of CI's slow stage")
    p.add_argument("--sweep", action="store_true", help="run the step-size sweep instead of the benchmark")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    p.add_argument("--ms", nargs="+", type=int, choices=(1, 2), help="numbers of constraints (default: the size's)")
    p.add_argument("--settings", nargs="+", type=int, choices=(0, 1, 2), help="thresholds: 0 barely .. 2 strongly active")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the size's)")
    p.add_argument("--n-estimate", type=int, help="fresh responses per prompt behind every E[g] estimate (default: the size's)")
    p.add_argument("--ppo-lambda-max", type=float, help="PPO-Lagrangian's cap on lambda (default: none, Safe-RLHF's main.py; "
                   "its scripts/ppo-lag.sh uses 5)")
    p.add_argument("--name", help="results file name (default: the size)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where to write the JSON results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    size = "small" if args.small else "full"
    overrides = {k: v for k, v in dict(ms=args.ms, settings=args.settings, seeds=args.seeds, n_estimate=args.n_estimate).items() if v is not None}
    if args.sweep: return sweep(size, args.out)
    caps = {} if args.ppo_lambda_max is None else dict(ppo_lambda_max=args.ppo_lambda_max)
    result = benchmark(size, args.out, tuple(args.methods), overrides, args.name or size, **caps)
    print(format_table(result["table"]))
    print("wall time to tolerance, primal-dual method / one-shot MoCAN, per seed:", json.dumps(result["ratios"]))
    print("goals:", json.dumps(result["goals"], indent=1))
    print(f"[bench] {size}: {result['seconds']:.0f} s -> {args.out / ((args.name or size) + '.json')}")


if __name__ == "__main__":
    main()
