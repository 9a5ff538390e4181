"""Crop nitrogen benchmark (issue 16): agent and baselines on held-out seasons, model
speed, and zero-shot deployment on the virtual field over real Channel Access.

    python benchmarks/crop.py [--policy pretrained] [--seasons 40] [--seed 0] [--ca-seasons 5]
                              [--day-s 0.1] [--out benchmarks/results]

1. Simulation: ``tbsac evaluate crop --crop wheat --seasons 40 --seed 0``: the agent, no
   N, the expert's three splits, the best fixed schedule and the soil-N target rule
   (both fitted on training seasons) and the hindsight optimum per season, on held-out
   seasons (``test`` preset: weather years 1992-1998, never trained on, x soils drawn
   from the seed).
2. Model speed: ms per simulated day over whole seasons (no N; the expert's schedule),
   and per season including the model's construction.
3. Zero-shot over CA: per season a virtual field (``tbsac ioc --lattice wheat``) and a
   session of the policy through the safety layer; the same policy on the simulated
   field of the same season, idle for the days the IOC ran before the session started;
   the IOC's put log is checked against the machine file (limits, largest step) and the
   seasonal cap.

Writes ``crop.json`` and ``crop.md`` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.registry import get_task  # noqa: E402
from deploy import check_puts, sessions_on_fresh_iocs  # noqa: E402

SETUP, MACHINE = "wheat", "virtual-field"
APPLIED, GRAIN = 8, 9  # reading positions: N applied so far, grain


def simulation(policy: str, seasons: int, seed: int) -> dict:
    from controller import api

    return api.evaluate("crop", SETUP, policy, seasons, seed, "test", get_task("crop").default_baselines).summary


def model_speed(seasons: int = 6) -> dict:
    """ms per simulated day over whole seasons, and whole seasons with the model's construction."""
    from simulators.crop.baselines import run_schedule

    definition = get_task("crop")
    setup = definition.load_setup(SETUP)
    plant = definition.sim_plant(setup, definition.load_errors("train"))
    config = definition.task_config(setup)
    plant.reset(0)  # warm: crop parameters read, modules imported
    per_day, per_season = [], []
    for s in range(seasons):
        for schedule in (None, setup.expert):
            t0 = time.perf_counter()
            plant.reset(s)
            t1 = time.perf_counter()
            run = run_schedule(plant, s, schedule, config)  # its own reset, then the season's days
            t2 = time.perf_counter()
            per_day.append(((t2 - t1) - (t1 - t0)) / len(run.doses) * 1e3)
            per_season.append(t2 - t1)
    return {"ms_per_day": {"median": round(float(np.median(per_day)), 3), "max": round(float(np.max(per_day)), 3)},
            "s_per_season": {"median": round(float(np.median(per_season)), 3)}, "seasons": 2 * seasons}


def over_channel_access(policy_name: str, seasons: int, seed: int, day_s: float) -> dict:
    from controller.policy import Policy
    from controller.session import run_session
    from safety.guard import InterlockRule

    definition = get_task("crop")
    setup = definition.load_setup(SETUP)
    agent = Policy.load(policy_name, definition, setup)
    rows = []
    for season, result, puts, machine in sessions_on_fresh_iocs(SETUP, MACHINE, agent, range(seed, seed + seasons), day_s):
        idle_days = int(result.events[0].data["readings"][0])  # the IOC ran these at dose 0 before the session
        sim = definition.sim_plant(setup, definition.load_errors("test"))
        sim.reset(season)
        for _ in range(idle_days):
            sim.write_knobs([0.0])
        sim_result = run_session(sim, agent, interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
        field_applied = [r.readings[APPLIED] for r in result.step_records]
        sim_applied = [r.readings[APPLIED] for r in sim_result.step_records]
        same = len(field_applied) == len(sim_applied) and np.allclose(field_applied, sim_applied, atol=1e-3)
        final = result.step_records[-1].readings if result.step_records else [np.nan] * 11
        violations = check_puts(puts, machine)
        cap = definition.safety_limits(agent.metadata)["budgets"][0]["limit"]
        if sum(p["value"] for p in puts) > cap + 1e-9:
            violations.append(f"puts add up to {sum(p['value'] for p in puts):.1f} kg N/ha > cap {cap}")
        rows.append({"season": season, "status": result.status, "steps": result.steps, "idle_days": idle_days,
                     "trips": result.trips, "n_applied": round(final[APPLIED], 2), "grain": round(final[GRAIN], 1),
                     "sim_n_applied": round(sim.season.applied, 2), "sim_grain": round(sim.season.variable("TWSO"), 1),
                     "same_doses_as_simulation": bool(same), "put_violations": violations,
                     "restored_to_zero": bool(result.restored)})
        print(f"  CA season {season}: {result.status} in {result.steps} days, N {final[APPLIED]:.1f} (sim "
              f"{sim.season.applied:.1f}), grain {final[GRAIN]:.0f} (sim {sim.season.variable('TWSO'):.0f}), "
              f"{len(violations)} put violations", file=sys.stderr, flush=True)
    return {"seasons": rows, "day_s": day_s, "put_violations": sum(len(r["put_violations"]) for r in rows),
            "trips": sum(len(r["trips"]) for r in rows),
            "same_as_simulation": sum(r["same_doses_as_simulation"] and abs(r["grain"] - r["sim_grain"]) < 0.5 for r in rows)}


def markdown(out: dict) -> str:
    sim = out["simulation"]
    lines = [f"# Crop benchmark: winter wheat, {out['seasons']} held-out seasons from seed {out['seed']}, policy "
             f"{out['policy']}", "",
             f"Economics: grain {sim['economics']['grain_price']} $/kg, N {sim['economics']['n_cost']} $/kg. Held-out "
             "seasons: weather years 1992-1998 (NL1) x soils drawn from the seed.", "",
             "| method | profit median ($/ha) | profit p5 | yield median (kg/ha) | yield p5 | N median (kg/ha) | "
             "NUE median (kg grain/kg N) | of hindsight (median) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in sim["results"].items():
        if "note" in r:
            lines.append(f"| {name} | {r['note']} | | | | | | |")
            continue
        f = lambda v, p="{:.0f}": "-" if v is None else p.format(v)  # noqa: E731
        lines.append(f"| {name} | {f(r['profit']['median'])} | {f(r['profit']['p5'])} | {f(r['yield_kg_ha']['median'])} | "
                     f"{f(r['yield_kg_ha']['p5'])} | {f(r['n_applied_kg_ha']['median'])} | {f(r['nue']['median'], '{:.1f}')} | "
                     f"{f(r['fraction_of_hindsight']['median'], '{:.1%}')} |")
    c, s = out["checks"], out["model_speed"]
    lines += ["", f"- agent profit median >= best fixed's: **{c['profit_at_least_best_fixed']}**; with N median <= best "
              f"fixed's: **{c['n_at_most_best_fixed']}**; >= 0.9 of hindsight: **{c['at_least_90pct_of_hindsight']}**",
              f"- schedules: " + "; ".join(f"{k} {v['trigger']} {list(v['at'])}: {list(v['doses'])} kg N/ha"
                                          for k, v in sim["schedules"].items()),
              f"- model: {s['ms_per_day']['median']:.2f} ms per simulated day (median; max {s['ms_per_day']['max']:.2f}) over "
              f"{s['seasons']} whole seasons; {s['s_per_season']['median']:.2f} s per season with the model's construction"]
    if "channel_access" in out:
        ca = out["channel_access"]
        lines.append(f"- zero-shot over CA, {len(ca['seasons'])} held-out seasons (one day every {ca['day_s']} s): "
                     f"{ca['same_as_simulation']} of {len(ca['seasons'])} with the simulation's doses and yield, "
                     f"{ca['put_violations']} put-log violations (limits, step, seasonal cap), {ca['trips']} trips")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="pretrained")
    parser.add_argument("--seasons", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ca-seasons", type=int, default=5)
    parser.add_argument("--day-s", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    summary = simulation(args.policy, args.seasons, args.seed)
    results = summary["results"]
    agent, fixed, ceiling = results["agent"], results.get("best_fixed", {}), results.get("hindsight", {})
    fraction = agent["fraction_of_hindsight"]["median"]
    out = {"policy": args.policy, "seasons": args.seasons, "seed": args.seed, "simulation": summary,
           "checks": {"profit_at_least_best_fixed": "profit" in fixed and agent["profit"]["median"] >= fixed["profit"]["median"],
                      "n_at_most_best_fixed": "profit" in fixed
                      and agent["n_applied_kg_ha"]["median"] <= fixed["n_applied_kg_ha"]["median"],
                      "at_least_90pct_of_hindsight": fraction is not None and fraction >= 0.9},
           "model_speed": model_speed()}
    if args.ca_seasons:
        out["channel_access"] = over_channel_access(args.policy, args.ca_seasons, args.seed, args.day_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crop.json").write_text(json.dumps(out, indent=2))
    text = markdown(out)
    (args.out / "crop.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
