"""Ray: split evaluations and training sweeps, serial against 2 workers (issue 19).

    python benchmarks/sweep.py [--injectors 40] [--trial-steps 3000] [--out benchmarks/results]

1. ``tbsac evaluate rfq --episodes 40 --json`` with every baseline (agent, Nelder-Mead,
   Xopt Bayesian optimisation, random search), serially and with ``--workers 2`` on local
   Ray: wall time of each command (Ray's start included), speed-up, and whether the two
   JSON results are identical.
2. A 6-trial orbit training sweep (3 cryomodules x 2 seeds) with ``tbsac sweep``, one trial
   at a time (``--max-concurrent 1``) and two at a time.

Each run uses its own store (a SQLite file in a temporary data directory). Writes
``sweep.json`` and ``sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import yaml


def tbsac(*args: str, data_dir: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ui.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "TBSAC_DATA_DIR": data_dir})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tbsac {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, round(wall, 1)


def split_evaluation(injectors: int) -> dict:
    args = ["evaluate", "rfq", "--episodes", str(injectors), "--json"]
    with TemporaryDirectory() as tmp:
        serial, serial_s = tbsac(*args, data_dir=tmp)
        split, split_s = tbsac(*args, "--workers", "2", data_dir=tmp)
    a, b = json.loads(serial.stdout), json.loads(split.stdout)
    return {"injectors": injectors, "serial_s": serial_s, "workers_2_s": split_s, "speedup": round(serial_s / split_s, 2),
            "identical": a == b, "summary": a}


def training_sweep(steps: int) -> dict:
    sweep = {"name": "bench-orbit", "task": "orbit", "lattices": ["cafe2-cm1", "cafe2-cm2", "cafe2-cm3"], "seeds": [0, 1],
             "train": {"steps": steps, "eval_every": max(500, steps // 3), "eval_episodes": 5}}
    out = {"trials": 6, "steps_per_trial": steps}
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep))
        for label, extra in (("serial", ["--max-concurrent", "1"]), ("workers_2", [])):
            data = Path(tmp) / label
            data.mkdir()
            proc, wall = tbsac("sweep", str(path), "--out", str(data / "trials"), "--json", *extra, data_dir=str(data))
            report = json.loads(proc.stdout)
            out[f"{label}_s"] = wall
            out[f"{label}_completed"] = sum(t["status"] == "completed" for t in report["trials"])
    out["speedup"] = round(out["serial_s"] / out["workers_2_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--injectors", type=int, default=40)
    parser.add_argument("--trial-steps", type=int, default=3000)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    report = {"cpus": os.cpu_count(), "evaluation": split_evaluation(args.injectors)}
    print(json.dumps({k: v for k, v in report["evaluation"].items() if k != "summary"}), flush=True)
    if not args.skip_sweep:
        report["sweep"] = training_sweep(args.trial_steps)
        print(json.dumps(report["sweep"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=1))
    ev = report["evaluation"]
    lines = ["# Ray: split evaluation and training sweep (`python benchmarks/sweep.py`)", "",
             f"{report['cpus']} CPUs; wall times of the whole commands, Ray's start included.", "",
             "| run | serial (s) | 2 workers (s) | speed-up | same numbers |", "|---|---|---|---|---|",
             f"| `tbsac evaluate rfq -n {ev['injectors']}` (agent + 3 baselines) | {ev['serial_s']} | {ev['workers_2_s']} | "
             f"{ev['speedup']}x | {'yes' if ev['identical'] else 'NO'} |"]
    if "sweep" in report:
        sw = report["sweep"]
        lines.append(f"| `tbsac sweep`: 6 orbit trials x {sw['steps_per_trial']} steps | {sw['serial_s']} | {sw['workers_2_s']} | "
                     f"{sw['speedup']}x | {sw['serial_completed']}/6 and {sw['workers_2_completed']}/6 completed |")
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
