"""Battery arbitrage on imbalance prices as a registered task (``tbsac train battery``)."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np

from core.config import ConfigError, load_shipped_or_file, shipped_yaml_names
from core.plant import KnobSpec, ReadingSpec
from core.task import EpisodeResult, TaskDefinition, concat_parts

from .model import PERIOD_H, BatteryConfig
from .task import PRESETS, BatterySimPlant, BatteryTask, BatteryTaskConfig, PriceModel, price_day, profit_metric, reading_indices

SETUP_DIR = resources.files("simulators.battery") / "setups"
# A year of training days: the MPC's forecast and the SDP's price model are fitted on them (with
# 60 days the MPC earned 61.7k EUR on the 60 benchmark days, with 365 days 63.2k: the agent
# trains on ~1,200 days, its baselines should not be starved of data).
TRAINING_DAYS_FOR_BASELINES = 365
THRESHOLD_TUNING_DAYS = 20  # the threshold grid search runs 300 pairs over every day


def cvar(values: np.ndarray, alpha: float = 0.05) -> float:
    """Mean of the worst `alpha` share of `values` (at least one)."""
    v = np.sort(np.asarray(values, dtype=float))
    return float(v[: max(1, int(np.ceil(alpha * len(v))))].mean())


def day_summary(profits: np.ndarray, discharged_mwh: np.ndarray, trades: np.ndarray, capacity: float,
                ceiling: np.ndarray | None) -> dict:
    """The evaluation summary of one method over days."""
    out = {
        "profit_eur": {"total": round(float(profits.sum()), 2), "daily_median": round(float(np.median(profits)), 2)},
        "cycles_per_day": {"mean": round(float(np.mean(discharged_mwh / capacity)), 3),
                           "max": round(float(np.max(discharged_mwh / capacity)), 3)},
        "cvar5_daily_profit_eur": round(cvar(profits), 2),
        "trades": int(trades.sum()),
    }
    out["fraction_of_ceiling"] = round(float(profits.sum() / ceiling.sum()), 4) if ceiling is not None and ceiling.sum() > 0 else None
    return out


@functools.lru_cache(maxsize=1)
def training_days() -> tuple[tuple[np.ndarray, float], ...]:
    """(prices, the last price of the day before) of the days the baselines are fitted on."""
    return tuple((today, float(before[-1])) for before, today in
                 (price_day(PRESETS["train"], s) for s in range(TRAINING_DAYS_FOR_BASELINES)))


@functools.lru_cache(maxsize=1)
def training_forecast():
    """The forecast fitted on the training days (the MPC's; its daily profile is also the agent's)."""
    from .baselines import Forecast

    return Forecast.fit(training_prices())


def training_prices() -> np.ndarray:
    """The training days' prices end to end (what the forecast and the SDP's model are fitted on)."""
    return np.concatenate([today for today, _ in training_days()])


@functools.lru_cache(maxsize=4)
def training_value_table(setup_json: str):
    """The stochastic DP's value table for a battery (its setup as JSON: a cache key) on
    the price model fitted to the training days (the ``sdp`` baseline and the agent's
    shaping potential; ~20 s to solve, once per process)."""
    from .sdp import CopulaFit, solve

    return solve(CopulaFit.fit(training_prices()), BatteryConfig.model_validate_json(setup_json))


class BatteryDefinition(TaskDefinition):
    """A grid battery trading on 15-minute imbalance prices: one power knob, price and SoC readings."""

    name = "battery"
    description = "battery arbitrage on 15-minute imbalance prices (one power setpoint; price, state of charge)"
    metrics = (profit_metric(),)
    default_arch = "mlp-small"
    architectures = ("mlp-small", "mlp")
    # TQC, the distributional SAC. The day is the horizon (96 undiscounted-ish
    # periods: a night charge pays back 60 periods later), so gamma 0.999; a larger replay
    # buffer than the beamline's (a day is 96 steps, not ~10).
    # The critics also read the rest of today's prices (privileged: the simulator's; the
    # actor never sees them): a day's profit swings with its prices far more than with one
    # action, and critics that see the day judge the action, not the day.
    sac_overrides = {"algorithm": "tqc", "gamma": 0.999, "learning_rate": 3e-4, "buffer_size": 300_000,
                     "learning_starts": 2000, "privileged_critic": True}
    train_defaults = {"steps": 150_000, "eval_every": 5000, "eval_episodes": 30}
    baselines = ("lp_ceiling", "mpc", "sdp", "threshold", "nothing")
    default_baselines = baselines
    safety_defaults = {"max_steps": 200, "max_duration_s": 3600.0, "max_excursion_steps": 2.0}
    sim_interlocks = [{"name": "soc_pct", "rule": "min", "threshold": 4.0}, {"name": "soc_pct", "rule": "max", "threshold": 96.0},
                      {"name": "inverter_ok", "rule": "equals", "threshold": 1.0}]
    summary_keys = ("profit_eur", "fraction_of_ceiling", "cycles_per_day", "cvar5_daily_profit_eur", "trades")
    scalars = {"eval/daily_profit_median": ("profit_eur", "daily_median")}
    eval_seed_base = 5_000_000
    safe_state_label = "no power (the battery stops injecting)"

    def safe_settings(self, knobs, start):
        return np.zeros(len(knobs))

    # Residual control (base: mpc): the actor starts at the MPC (action 0) and its critics first
    # learn the MPC's value with the actor frozen; a small fixed entropy weight (SB3's automatic
    # one starts at 1: a random walk away from the plan) and a slower learning rate.
    RESIDUAL_OVERRIDES = {"zero_init_actor": True, "frozen_actor_steps": 20_000, "ent_coef": 0.01, "learning_rate": 1e-4}

    def training_overrides(self, config: BatteryTaskConfig) -> dict:
        return dict(self.RESIDUAL_OVERRIDES) if config.base == "mpc" else {}

    def safety_limits(self, metadata: dict) -> dict:
        """The defaults plus the daily discharge budget of the battery the policy was trained for."""
        config = BatteryTaskConfig.model_validate(metadata.get("task_config", {}))
        budget = {"knob": "power", "direction": "positive", "per_write": PERIOD_H, "window_writes": 96,
                  "limit": config.cycles_per_day * config.capacity_mwh, "unit": "MWh", "label": "daily discharge budget"}
        return {**self.safety_defaults, "budgets": [budget]}

    # -- setups ---------------------------------------------------------------------------
    def shipped_setups(self) -> list[str]:
        return shipped_yaml_names(SETUP_DIR)

    def load_setup(self, name_or_path) -> BatteryConfig:
        return load_shipped_or_file(BatteryConfig, SETUP_DIR, name_or_path, "battery", "battery")

    def error_presets(self) -> list[str]:
        return sorted(PRESETS)

    def load_errors(self, name_or_path) -> PriceModel:
        """A price preset (``train``, ``test``: synthetic days) or a price file (CSV: timestamp, EUR/MWh)."""
        if str(name_or_path) in PRESETS:
            return PRESETS[str(name_or_path)]
        path = Path(str(name_or_path))
        if path.suffix.lower() == ".csv":
            model = PriceModel(name=path.stem, csv=str(path.resolve()))
            price_day(model, 0)  # read and check it now: a bad row is named before anything starts
            return model
        raise ConfigError(f"prices {name_or_path!r}: expected one of {', '.join(sorted(PRESETS))} or a CSV price file "
                          "(timestamp, EUR/MWh per 15 minutes)")

    def sim_plant(self, setup: BatteryConfig, errors: PriceModel) -> BatterySimPlant:
        return BatterySimPlant(setup, errors)

    def config_model(self) -> type:
        return BatteryTaskConfig

    @staticmethod
    def _complete(config: BatteryTaskConfig, setup: BatteryConfig | None = None, **update) -> BatteryTaskConfig:
        """The config with the battery's size and, if observed or planned on, the training
        days' forecast (the MPC's: daily profile, AR decay) and the battery the MPC plans for."""
        residual = config.base == "mpc"
        if (config.profile_features or residual) and not config.profile:  # as the MPC's forecast has it
            update["profile"] = tuple(round(float(v), 3) for v in training_forecast().profile)
        if residual and config.forecast_ar is None:
            update["forecast_ar"] = round(training_forecast().ar, 6)
        if residual and config.battery is None:
            if setup is None:
                raise ConfigError("battery task: a residual (base mpc) policy must record the battery its MPC plans for")
            update["battery"] = setup
        return config.model_copy(update=update)

    def make_task(self, setup: BatteryConfig, knobs: list[KnobSpec], readings: list[ReadingSpec], config) -> BatteryTask:
        config = self._complete(config, setup, cycles_per_day=setup.max_cycles_per_day, capacity_mwh=setup.capacity_mwh)
        # The SDP potential shapes training rewards only: a policy's task (evaluation,
        # deployment) keeps its books without it and does not wait for the solve.
        table = training_value_table(setup.model_dump_json()) if config.shaping_potential == "sdp" else None
        return BatteryTask(float(knobs[0].upper), config, reading_indices(readings), value_table=table)

    def task_for_policy(self, knobs, readings, metadata):
        config = self._complete(BatteryTaskConfig.model_validate(metadata.get("task_config", {})))
        return BatteryTask(float(knobs[0].upper), config, reading_indices(readings))

    def policy_metadata(self, setup: BatteryConfig, errors, config, task: BatteryTask) -> dict:
        return {"lattice": {"name": setup.name, "power_mw": setup.power_mw, "capacity_mwh": setup.capacity_mwh},
                "observation": {"size": int(task.observation_space.shape[0]),
                                "layout": "settled prices, their changes, SoC, time of day (sin, cos), budget used, power"},
                "action": {"size": 1, "unit": "fraction of rated power"}}

    def check_policy(self, metadata: dict, setup: BatteryConfig) -> str | None:
        trained = metadata.get("lattice", {})
        if trained.get("power_mw") != setup.power_mw or trained.get("capacity_mwh") != setup.capacity_mwh:
            return (f"field 'metadata.lattice': policy was trained for {trained.get('power_mw')} MW / "
                    f"{trained.get('capacity_mwh')} MWh, battery {setup.name} is {setup.power_mw} MW / {setup.capacity_mwh} MWh")
        return None

    # -- evaluation ----------------------------------------------------------------------
    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        profits = np.array([e.final["profit_eur"] for e in episodes])
        discharged = np.array([e.info.get("discharged_mwh", 0.0) for e in episodes])
        return {"profit_eur": {"total": round(float(profits.sum()), 2), "daily_median": round(float(np.median(profits)), 2)},
                "cvar5_daily_profit_eur": round(cvar(profits), 2), "discharged_mwh": float(discharged.sum())}

    def score(self, summary: dict) -> tuple:
        return (summary["profit_eur"]["total"], summary["cvar5_daily_profit_eur"])

    relative_bar = True

    def bar_met(self, summary: dict) -> bool:
        return False  # the bar is relative to the baselines on the same days (benchmarks/battery.py)

    CEILING = "_ceiling_eur"  # in an evaluation part: each day's perfect-foresight profit (every method's reference)

    def evaluate_part(self, setup: BatteryConfig, errors: PriceModel, agent, seeds, methods, budget=None, **extra):
        """Per method, each day's prices, power, state of charge and profit on days `seeds`."""
        from .baselines import mpc_decider, nothing_decider, run_day, threshold_decider, tune_thresholds
        from .model import perfect_foresight

        forecast = training_forecast()
        deciders = {}
        if "mpc" in methods:
            deciders["mpc"] = lambda: mpc_decider(forecast, setup)
        if "sdp" in methods:
            from .sdp import sdp_decider

            table = training_value_table(setup.model_dump_json())
            deciders["sdp"] = lambda: sdp_decider(table)
        if "threshold" in methods:
            low, high = tune_thresholds(list(training_days()[:THRESHOLD_TUNING_DAYS]), setup)
            deciders["threshold"] = lambda: threshold_decider(low, high, setup)
        if "nothing" in methods:
            deciders["nothing"] = lambda: nothing_decider
        days = [(today, float(before[-1])) for before, today in (price_day(errors, s) for s in seeds)]
        plans = [perfect_foresight(d, setup) for d, _ in days]
        runs: dict[str, list] = {self.CEILING: [float(plan.profit_eur) for plan in plans]}

        def record(name: str, powers: list[np.ndarray], profits: list[float], socs: list[np.ndarray]) -> None:
            runs[name] = [{"price": d.tolist(), "power_mw": np.asarray(p).tolist(), "soc": np.asarray(soc).tolist(),
                           "profit_eur": float(total)} for (d, _), p, soc, total in zip(days, powers, socs, profits)]

        if agent is not None:
            env = BatterySimPlant(setup, errors)
            task = self.task_for_policy(env.knobs, env.readings, agent.metadata)
            from core.task import run_episode

            powers, profits, socs = [], [], []
            for s in seeds:
                env.reset(s)
                run_episode(task, env, agent.act, seed=s)
                powers.append(np.array(env.powers))
                profits.append(sum(env.profits))
                socs.append(np.array(env.socs))
            record("agent", powers, profits, socs)
        if "lp_ceiling" in methods:
            record("lp_ceiling", [plan.power_mw for plan in plans], [plan.profit_eur for plan in plans], [plan.soc for plan in plans])
        for name, make in deciders.items():
            results = [run_day(d, prev, setup, make()) for d, prev in days]
            record(name, [r.power_mw for r in results], [r.total for r in results],
                   [np.concatenate([[setup.soc_start], r.soc]) for r in results])
        return runs

    def merge_evaluation(self, setup: BatteryConfig, errors: PriceModel, agent, parts, seed, methods, budget=None):
        runs = concat_parts(parts)
        ceiling = np.array(runs.pop(self.CEILING))
        results = {}
        for name, days in runs.items():
            powers = [np.asarray(d["power_mw"]) for d in days]
            discharged = np.array([np.clip(p, 0, None).sum() * PERIOD_H for p in powers])
            trades = np.array([int(np.sum(np.abs(np.diff(np.concatenate([[0.0], p]))) > 1e-6)) for p in powers])
            results[name] = day_summary(np.array([d["profit_eur"] for d in days]), discharged, trades, setup.capacity_mwh,
                                        ceiling)
        summary = {"task": self.name, "lattice": setup.name, "errors": errors.name, "episodes": len(ceiling), "seed": seed,
                   "results": results}
        return summary, runs

    def results_table(self, summary: dict):
        columns = ["method", "profit total (EUR)", "daily median (EUR)", "of ceiling", "cycles/day mean", "cycles/day max",
                   "CVaR5 daily (EUR)", "trades"]
        rows = [[name, f"{r['profit_eur']['total']:.0f}", f"{r['profit_eur']['daily_median']:.0f}",
                 "-" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.1%}",
                 f"{r['cycles_per_day']['mean']:.2f}", f"{r['cycles_per_day']['max']:.2f}",
                 f"{r['cvar5_daily_profit_eur']:.0f}", str(r["trades"])] for name, r in summary["results"].items()]
        return columns, rows

    def plot_evaluation(self, setup: BatteryConfig, runs: dict, path: Path, title: str) -> Path | None:
        from .evaluation import plot_battery_evaluation

        return plot_battery_evaluation(runs, path, title) if runs else None

    def panels(self, setup: BatteryConfig) -> list[dict]:
        # The console's trend chart shows the primary metric, the cumulative profit (EUR).
        return [{"kind": "series", "title": "Price, state of charge, power", "readings": ["price", "soc", "power_kw"],
                 "step_title": "settlement period of the session", "interpolate": "step-after",
                 "caption": "settled imbalance price; state of charge; power delivered (> 0 discharges)"}]

    def wiring(self, setup: BatteryConfig, knobs: list[KnobSpec]) -> tuple[list[float], str]:
        return [1000.0] * len(knobs), "kW"  # the inverter takes its setpoint in kW
