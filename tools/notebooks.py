"""Execute the notebooks in a real Jupyter kernel, as a reader does, and keep their committed outputs fresh.

    python tools/notebooks.py run   [NB ...] [--slow]   # execute, write the outputs into the notebooks, nbdev_clean them
    python tools/notebooks.py check [NB ...] [--slow]   # execute and compare with the committed outputs; exit 1 if stale
    python tools/notebooks.py run nbs/31_smollm2_run.ipynb --smollm2   # also the SmolLM2 cells (about an hour on 2 cores)

Every code cell runs top to bottom in an `ipykernel` through `nbclient`, with the notebook's folder as working
directory, so an asyncio loop is running (unlike under `nbdev_test`). Cells flagged `#| slow` run only with `--slow`;
without it they keep their committed outputs. Cells flagged `#| smollm2` (an hour or more on CPU) run only with `--smollm2`,
with no time limit per cell. Scratch notebooks (`_*.ipynb`) are skipped.

`check` compares each code cell's text outputs (stdout and `text/plain` results; not stderr, images or widgets):
the text between numbers must be equal and every number must agree to `abs(a - b) <= ATOL + RTOL * abs(b)`, because the
3rd-4th decimals of trained models differ across CPUs and thread counts. Durations (`12 s`, `3.4 ms`), memory
addresses and temporary folders are ignored.
"""
import argparse, copy, json, os, re, subprocess, sys, tempfile, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

root = Path(__file__).resolve().parent.parent
RTOL, ATOL = 2e-2, 2e-3
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
IGNORED = re.compile(r"0x[0-9a-fA-F]+|[-+]?\d+(?:\.\d+)?\s?(?:ms|s|min)\b|" + re.escape(tempfile.gettempdir()) + r"/tmp\w+")

def has_flag(cell, flag:str)->bool:
    "Whether a code cell carries the test flag `flag` (`#| slow`, `#| smollm2`)."
    return any(l.replace(" ", "").strip() == f"#|{flag}" for l in "".join(cell["source"]).splitlines()
               if l.lstrip().startswith("#|"))

def is_slow(cell, slow:bool=False, smollm2:bool=False)->bool:
    "Whether a code cell is left out: `slow` cells unless `--slow`; `smollm2` cells (an hour on CPU) unless `--smollm2`."
    return (has_flag(cell, "slow") and not slow) or (has_flag(cell, "smollm2") and not smollm2)

def text_outputs(cell)->str:
    "The cell's outputs that `check` compares: stdout and plain-text results."
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream" and o["name"] == "stdout": out.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data"):
            data = o.get("data", {})
            if "text/plain" in data and not any(k.startswith(("image/", "application/vnd.jupyter.widget")) for k in data):
                out.append("".join(data["text/plain"]))
        elif o["output_type"] == "error": out.append(f"{o['ename']}: {o['evalue']}")
    return IGNORED.sub("#", "\n".join(out))

def differences(old:str, new:str)->str|None:
    "None when two outputs agree (text equal, numbers within tolerance), else a short description."
    if NUMBER.split(old) != NUMBER.split(new): return f"text differs:\n--- committed\n{old[:800]}\n--- now\n{new[:800]}"
    for a, b in zip(map(float, NUMBER.findall(new)), map(float, NUMBER.findall(old))):
        if abs(a - b) > ATOL + RTOL * abs(b): return f"number {a} (now) vs {b} (committed):\n--- now\n{new[:800]}"
    return None

def execute(path:Path, slow:bool, smollm2:bool=False):
    "Execute the notebook at `path` in a kernel; returns (the notebook with new outputs, seconds)."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    run = copy.deepcopy(nb)
    skipped = [i for i, c in enumerate(run.cells) if c.cell_type == "code" and is_slow(c, slow, smollm2)]
    for i in skipped: run.cells[i].source = ""
    start = time.time()
    NotebookClient(run, timeout=None if smollm2 else 1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for i, (cell, new) in enumerate(zip(nb.cells, run.cells)):
        if cell.cell_type == "code" and i not in skipped: cell.outputs, cell.execution_count = new.outputs, None
    return nb, time.time() - start

def job(args):
    "Run or check one notebook; returns (name, seconds, list of problems)."
    path, mode, slow, smollm2 = args
    import nbformat
    try: nb, seconds = execute(path, slow, smollm2)
    except Exception as e: return path.name, 0.0, [f"execution failed: {type(e).__name__}: {str(e)[-1500:]}"]
    if mode == "run":
        nbformat.write(nb, path)
        subprocess.run([str(Path(sys.executable).parent / "nbdev_clean"), "--fname", str(path)], check=True, capture_output=True)
        return path.name, seconds, []
    old = nbformat.read(path, as_version=4)
    problems = []
    for i, (a, b) in enumerate(zip(old.cells, nb.cells)):
        if a.cell_type != "code" or is_slow(a, slow, smollm2): continue
        d = differences(text_outputs(a), text_outputs(b))
        if d: problems.append(f"cell {i} ({a.get('id', '?')}): {d}")
    return path.name, seconds, problems

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["run", "check"])
    p.add_argument("notebooks", nargs="*", help="default: every nbs/*.ipynb except scratch notebooks (_*.ipynb)")
    p.add_argument("--slow", action="store_true", help="also run the cells flagged `#| slow`")
    p.add_argument("--smollm2", action="store_true", help="also run the cells flagged `#| smollm2` (no time limit per cell)")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_intermixed_args(argv)
    paths = [Path(n).resolve() for n in a.notebooks] or sorted(p for p in (root / "nbs").glob("*.ipynb") if not p.name.startswith("_"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    failed = False
    with ProcessPoolExecutor(a.workers) as pool:
        for name, seconds, problems in pool.map(job, [(path, a.mode, a.slow, a.smollm2) for path in paths]):
            print(f"{name:40s} {seconds:6.1f} s  {'ok' if not problems else 'STALE OR FAILED'}", flush=True)
            for pr in problems: print("    " + pr.replace("\n", "\n    "))
            failed |= bool(problems)
    if failed:
        sys.exit("some notebooks failed in a Jupyter kernel or their committed outputs are stale: "
                 "run `python tools/notebooks.py run` and commit the notebooks")

if __name__ == "__main__": main()
