"""RFQ transmission acceptance benchmarks (issue 6).

    python benchmarks/rfq.py [--episodes 100] [--workers 2] [--zero-shot-seeds 10] [--out benchmarks/results]

1. Simulation: the pretrained lpi agent, Nelder-Mead, Xopt Bayesian optimisation and
   random search on the same unseen injectors ('test' errors, seeds 1000..) with a
   30-step budget, as ``tbsac evaluate rfq --json`` but split over worker processes.
2. Zero-shot over Channel Access: for each seed, ``tbsac ioc --lattice lpi --errors test``
   and ``tbsac run --machine virtual-lpi --policy pretrained --json``; count sessions
   ending at or above 85 % transmission, safety trips, and IOC-side limit violations.

Writes ``rfq.json`` and ``rfq.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).parent))
from deploy import check_puts  # noqa: E402

from hardware.ioc import free_port, loopback_environment, read_put_log, start_virtual_ioc  # noqa: E402
from hardware.machine import load_machine  # noqa: E402

SEED = 1000
BUDGET = 30


def _chunk(seeds: tuple[int, int]):
    import torch

    torch.set_num_threads(1)  # one worker per core: BoTorch's threads would oversubscribe them
    from controller.policy import Policy
    from core.registry import get_task
    from simulators.injector.baselines import RFQ_METHODS, evaluate_rfq
    from simulators.injector.model import load_injector
    from simulators.injector.task import load_injector_errors

    lattice = load_injector("lpi")
    agent = Policy.load("pretrained", get_task("rfq"), lattice)
    _, runs = evaluate_rfq(lattice, load_injector_errors("test"), agent, seeds[1], seeds[0], BUDGET, RFQ_METHODS)
    return runs


def simulation(episodes: int, workers: int) -> dict:
    from simulators.injector.baselines import rfq_summary

    size = -(-episodes // workers)
    chunks = [(SEED + k, min(size, episodes - k)) for k in range(0, episodes, size)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_chunk, chunks))
    runs = {m: [e for part in parts for e in part[m]] for m in parts[0]}
    return rfq_summary("lpi", "test", SEED, BUDGET, runs)


def zero_shot(seeds: range, ramp: float) -> dict:
    machine, _ = load_machine("virtual-lpi")
    runs = []
    with TemporaryDirectory() as tmp:
        for seed in seeds:
            port = free_port()
            log = Path(tmp) / f"puts-{seed}.jsonl"
            ioc = start_virtual_ioc("lpi", seed, "test", port, ramp, log)
            try:
                env = {**os.environ, **loopback_environment(port), "TBSAC_DATA_DIR": tmp}
                snap = Path(tmp) / f"snap-{seed}.json"
                proc = subprocess.run(
                    [sys.executable, "-m", "ui.cli", "run", "--machine", "virtual-lpi", "--policy", "pretrained", "--json",
                     "--snapshot", str(snap)], capture_output=True, text=True, env=env, timeout=600,
                )
                result = json.loads(proc.stdout) if proc.stdout.strip() else {"trips": [proc.stderr.strip()]}
            finally:
                ioc.terminate()
                ioc.wait(10)
            knobs = json.loads(snap.read_text())["knobs"] if snap.exists() else {}
            start = {c.setpoint: knobs.get(c.name, 0.0) * c.scale for c in machine.knobs}
            result.update(seed=seed, exit_code=proc.returncode,
                          ioc_limit_violations=check_puts(read_put_log(log), machine, start))
            runs.append(result)
            print(json.dumps({k: result.get(k) for k in ("seed", "initial_transmission", "final_transmission", "steps", "trips")}),
                  flush=True)
    reached = [r for r in runs if (r.get("final_transmission") or 0) >= 0.85]
    return {
        "sessions": len(runs),
        "reached_85": len(reached),
        "trips": sum(len(r.get("trips", [])) for r in runs),
        "ioc_limit_violations": sum(len(r["ioc_limit_violations"]) for r in runs),
        "median_initial": statistics.median(r.get("initial_transmission") or 0 for r in runs),
        "median_final": statistics.median(r.get("final_transmission") or 0 for r in runs),
        "median_wall_s": statistics.median(r.get("wall_s", 0) for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero-shot-seeds", type=int, default=10)
    parser.add_argument("--ramp", type=float, default=0.2)
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    report = {}
    previous = args.out / "rfq.json"
    if args.skip_simulation and previous.exists():
        # Re-measure only the zero-shot part; keep the simulation numbers already recorded.
        report = {k: v for k, v in json.loads(previous.read_text()).items() if k == "simulation"}
    if args.zero_shot_seeds:
        report["zero_shot"] = zero_shot(range(args.zero_shot_seeds), args.ramp)
    if not args.skip_simulation:
        report["simulation"] = simulation(args.episodes, args.workers)
        print(json.dumps(report["simulation"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rfq.json").write_text(json.dumps(report, indent=2))
    lines = ["# RFQ transmission benchmarks (lpi)", ""]
    if "simulation" in report:
        s = report["simulation"]
        lines += [f"Simulation: {s['episodes']} unseen injectors ('test' errors, seeds {SEED}..), {BUDGET} steps each; "
                  f"best achievable median {s['best_achievable']['median']} (min {s['best_achievable']['min']}).", "",
                  "| method | final T median | final T p95 | final / best median | final / best p5 | steps to 85 % median (reached) | steps to 0.9 best median (reached) | injectors with a step below half the start T |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in s["results"].items():
            lines.append(f"| {name} | {r['final_transmission']['median']} | {r['final_transmission']['p95']} "
                         f"| {r['fraction_of_best']['median']} | {r['fraction_of_best']['p5']} "
                         f"| {r['steps_to_85']['median']} ({r['steps_to_85']['reached']}) "
                         f"| {r['steps_to_90pct_best']['median']} ({r['steps_to_90pct_best']['reached']}) | {r['collapses']} |")
    if "zero_shot" in report:
        z = report["zero_shot"]
        lines += ["", f"Zero-shot over Channel Access (`tbsac ioc --lattice lpi --errors test`, seeds 0..{z['sessions'] - 1}, "
                  f"ramp {args.ramp} s): {z['reached_85']}/{z['sessions']} sessions end at >= 85 % transmission; "
                  f"{z['trips']} safety trips; {z['ioc_limit_violations']} IOC-side limit violations; median transmission "
                  f"{z['median_initial']:.3f} -> {z['median_final']:.3f}; median wall time {z['median_wall_s']} s."]
    (args.out / "rfq.md").write_text("\n".join(lines) + "\n")
    print(f"written {args.out / 'rfq.json'} and {args.out / 'rfq.md'}")


if __name__ == "__main__":
    main()
