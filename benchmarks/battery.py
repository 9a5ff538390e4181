"""Battery arbitrage benchmark (issue 15): simulation, solver and environment speed, and
zero-shot deployment over real Channel Access.

    python benchmarks/battery.py [--policy pretrained] [--days 60] [--seed 0] [--ca-days 10]
                                 [--period-s 0.2] [--out benchmarks/results]

1. Simulation: the agent and every baseline (LP ceiling, MPC, SDP, threshold, nothing) on
   `--days` held-out days (the ``test`` price preset, generator seeds disjoint from
   training): profit, fraction of the ceiling, cycles per day, CVaR5 of daily profit;
   and where the agent falls short of the SDP (its expected loss period by period
   against the SDP's decision from the agent's own state, by time of day and power).
2. Speed: the LP ceiling of all those days (wall time), the environment's steps per
   second on one core (random actions through the task, as training runs it).
3. Zero-shot over CA: for each of `--ca-days` held-out days a virtual battery IOC
   (``tbsac ioc --lattice bess-1mw-2mwh --period-s``) and a session of the policy
   through the safety layer; the same policy on the simulated battery with the same
   prices (the IOC idled at 0 kW until the session started, so the simulation idles as
   many periods first); the IOC's own put log is checked against the machine file.

Writes ``battery.json`` and ``battery.md`` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TBSAC_DATA_DIR", tempfile.mkdtemp(prefix="tbsac-bench-"))

from core.registry import get_task  # noqa: E402
from core.task import TaskEnv  # noqa: E402
from deploy import sessions_on_fresh_iocs  # noqa: E402

LATTICE = "bess-1mw-2mwh"
MACHINE = "virtual-bess"


def simulation(policy: str, days: int, seed: int):
    """The evaluation's summary and its per-day runs."""
    from controller import api

    ev = api.evaluate("battery", LATTICE, policy, days, seed, "test", None, None)
    return ev.summary, ev.runs


def regret_against_sdp(agent_days: list[dict], seed: int) -> dict:
    """Where the agent falls short of the SDP: each period's expected loss against the SDP's
    best decision from the agent's own state (``sdp.day_regrets``), by quarter of the day and
    by the size of the power delivered."""
    from simulators.battery.definition import training_value_table
    from simulators.battery.sdp import day_regrets
    from simulators.battery.task import PRESETS, price_day

    setup = get_task("battery").load_setup(LATTICE)
    table = training_value_table(setup.model_dump_json())
    regrets, powers = [], []
    for i, day in enumerate(agent_days):
        previous = float(price_day(PRESETS["test"], seed + i)[0][-1])
        regrets.append(day_regrets(table, previous, day["price"], day["power_mw"], day["soc"]))
        powers.append(np.abs(day["power_mw"]))
    regrets, powers = np.concatenate(regrets), np.concatenate(powers)
    quarters = np.tile(np.repeat(np.arange(4), 24), len(agent_days))
    small = (powers > 1e-6) & (powers < 0.3 * setup.power_mw)
    return {"total_eur": round(float(regrets.sum()), 1),
            "by_six_hours_eur": [round(float(regrets[quarters == q].sum()), 1) for q in range(4)],
            "at_no_power_eur": round(float(regrets[powers <= 1e-6].sum()), 1),
            "below_30pct_power_eur": round(float(regrets[small].sum()), 1),
            "share_of_periods_below_30pct": round(float(small.mean()), 3)}


def lp_seconds(days: int, seed: int) -> float:
    from simulators.battery.model import perfect_foresight
    from simulators.battery.task import PRESETS, price_day

    definition = get_task("battery")
    setup = definition.load_setup(LATTICE)
    prices = [price_day(PRESETS["test"], seed + i)[1] for i in range(days)]
    start = time.perf_counter()
    for day in prices:
        perfect_foresight(day, setup)
    return time.perf_counter() - start


def env_steps_per_second(steps: int = 50_000) -> float:
    definition = get_task("battery")
    setup = definition.load_setup(LATTICE)
    plant = definition.sim_plant(setup, definition.load_errors("train"))
    env = TaskEnv(plant, definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()()))
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, 1)).astype(np.float32)
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    return steps / (time.perf_counter() - start)


def put_violations(puts: list[dict], machine, budget_mwh: float, period_h: float) -> list[str]:
    """Puts beyond the power limits, the ramp limit or the day's discharge budget."""
    knob = machine.knobs[0]
    problems, last, discharged = [], 0.0, 0.0
    for p in puts:
        if p["pv"] != knob.setpoint:
            continue
        v = p["value"]
        if not knob.lower - 1e-9 <= v <= knob.upper + 1e-9:
            problems.append(f"{v} kW outside [{knob.lower}, {knob.upper}]")
        if abs(v - last) > knob.max_step + 1e-9:
            problems.append(f"ramp {v - last:+.1f} kW > {knob.max_step}")
        discharged += max(v, 0.0) / abs(knob.scale) * period_h
        last = v
    if discharged > budget_mwh + 1e-6:
        problems.append(f"setpoints discharge {discharged:.3f} MWh > budget {budget_mwh}")
    return problems


def over_channel_access(policy_name: str, days: int, seed: int, period_s: float) -> dict:
    """Zero-shot sessions against virtual battery IOCs, each compared with the simulation."""
    from controller.policy import Policy
    from controller.session import run_session
    from safety.guard import InterlockRule

    definition = get_task("battery")
    setup = definition.load_setup(LATTICE)
    agent = Policy.load(policy_name, definition, setup)
    budget = setup.max_cycles_per_day * setup.capacity_mwh
    rows = []
    for day, result, puts, machine in sessions_on_fresh_iocs(LATTICE, MACHINE, agent, range(seed, seed + days), period_s):
        # The IOC idled at 0 kW until the session started: the simulation idles as many periods first.
        start_period = (int(result.events[0].data["readings"][3]) + 1) % 96
        sim = definition.sim_plant(setup, definition.load_errors("test"))
        sim.reset(day)
        for _ in range(start_period):
            sim.write_knobs([0.0])
        sim_result = run_session(sim, agent, interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
        violations = put_violations(puts, machine, budget, 0.25)
        rows.append({"day": day, "start_period": start_period, "status": result.status, "trips": result.trips,
                     "profit_ca_eur": round(result.final, 2), "profit_sim_eur": round(sim_result.final, 2),
                     "steps": result.steps, "put_violations": violations})
        print(f"  CA day {day}: {result.status}, {result.final:.2f} EUR over CA vs {sim_result.final:.2f} in "
              f"simulation, {len(violations)} put violations", file=sys.stderr, flush=True)
    ca, sim = sum(r["profit_ca_eur"] for r in rows), sum(r["profit_sim_eur"] for r in rows)
    return {"days": rows, "profit_ca_eur": round(ca, 2), "profit_sim_eur": round(sim, 2),
            "relative_difference": round(abs(ca - sim) / max(abs(sim), 1e-9), 5),
            "put_violations": sum(len(r["put_violations"]) for r in rows),
            "trips": sum(len(r["trips"]) for r in rows), "period_s": period_s}


def regret_line(regret: dict) -> str:
    quarters = ", ".join(f"{6 * q:02d}-{6 * q + 6:02d} h {v:.0f}" for q, v in enumerate(regret["by_six_hours_eur"]))
    return (f"- the agent's expected loss against the SDP's decisions from its own states: {regret['total_eur']:.0f} EUR "
            f"({quarters}; at no power {regret['at_no_power_eur']:.0f}, below 30 % of rated power "
            f"{regret['below_30pct_power_eur']:.0f} in {regret['share_of_periods_below_30pct']:.0%} of the periods)")


def markdown(out: dict) -> str:
    sim = out["simulation"]["results"]
    lines = [f"# Battery benchmark ({out['days']} held-out days from seed {out['seed']}, policy {out['policy']})", "",
             "| method | profit (EUR) | daily median | of LP ceiling | cycles/day mean / max | CVaR5 daily (EUR) | trades |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sim.items():
        frac = "-" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.1%}"
        lines.append(f"| {name} | {r['profit_eur']['total']:.0f} | {r['profit_eur']['daily_median']:.0f} | {frac} | "
                     f"{r['cycles_per_day']['mean']:.2f} / {r['cycles_per_day']['max']:.2f} | "
                     f"{r['cvar5_daily_profit_eur']:.0f} | {r['trades']} |")
    lines += ["", f"- agent >= best of MPC and threshold: **{out['checks']['agent_beats_baselines']}**; "
              f"cycles/day never above 2: **{out['checks']['cycles_within_limit']}**; CVaR5 no worse than threshold: "
              f"**{out['checks']['cvar_not_worse_than_threshold']}**; (beside the bar) agent >= SDP: "
              f"**{out['checks']['agent_beats_sdp']}**",
              regret_line(out["regret_against_sdp"]),
              f"- LP ceiling of {out['days']} days: {out['lp_seconds']:.2f} s; environment: {out['env_steps_per_s']:.0f} steps/s "
              "(one core)"]
    if "channel_access" in out:
        ca = out["channel_access"]
        lines.append(f"- zero-shot over CA, {len(ca['days'])} days (one period every {ca['period_s']} s): "
                     f"{ca['profit_ca_eur']:.0f} EUR vs {ca['profit_sim_eur']:.0f} EUR in simulation on the same prices "
                     f"({ca['relative_difference']:.2%} apart), {ca['put_violations']} put-log violations, {ca['trips']} trips")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="pretrained")
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ca-days", type=int, default=10)
    parser.add_argument("--period-s", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    summary, runs = simulation(args.policy, args.days, args.seed)
    results = summary["results"]
    best_baseline = max(results["mpc"]["profit_eur"]["total"], results["threshold"]["profit_eur"]["total"])
    out = {"policy": args.policy, "days": args.days, "seed": args.seed, "simulation": summary,
           "checks": {"agent_beats_baselines": results["agent"]["profit_eur"]["total"] >= best_baseline,
                      "cycles_within_limit": all(r["cycles_per_day"]["max"] <= 2.0 + 1e-9 for r in results.values()),
                      "cvar_not_worse_than_threshold": results["agent"]["cvar5_daily_profit_eur"]
                      >= results["threshold"]["cvar5_daily_profit_eur"],
                      # not the bar: the stochastic DP on the fitted price model, beside it
                      "agent_beats_sdp": results["agent"]["profit_eur"]["total"] >= results["sdp"]["profit_eur"]["total"]},
           "regret_against_sdp": regret_against_sdp(runs["agent"], args.seed),
           "lp_seconds": round(lp_seconds(args.days, args.seed), 3), "env_steps_per_s": round(env_steps_per_second())}
    if args.ca_days:
        out["channel_access"] = over_channel_access(args.policy, args.ca_days, args.seed, args.period_s)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "battery.json").write_text(json.dumps(out, indent=2))
    text = markdown(out)
    (args.out / "battery.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
