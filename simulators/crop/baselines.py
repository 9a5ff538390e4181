"""What growers do without an agent, and the ceiling.

- ``none``: no nitrogen;
- ``expert``: the setup's split schedule (wheat: three splits by development stage;
  maize: the seed's gym-DSSAT schedule, 27/35/54 kg at 40/45/80 days after planting);
- ``best_fixed``: the expert's splits with their doses optimised on training seasons
  (``python -m simulators.crop.baselines fit --setup wheat``; stored beside the setup file,
  ``<setup>.best-fixed.json``);
- ``target_rule``: the agent's action held still: from the first to the last development
  stage, fill the soil mineral-N pool up to one level every day, the level fitted on
  training seasons (``python -m simulators.crop.baselines fit-target --setup wheat``);
  the simplest feedback rule, and the bar the agent's state-dependent targets must clear;
- ``hindsight``: per season, the split doses optimised knowing that season's weather and
  field (the ceiling of split schedules; an adaptive agent may pass it).

Every schedule runs on the same simulated field as the agent (:class:`CropSimPlant`),
under the same rules (minimum dose, last development stage, seasonal cap).
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from core.task import run_episode

from .task import CropErrors, CropSetup, CropSimPlant, CropTask, CropTaskConfig, Schedule, soil_n_target_action

FIT_SEASONS = 16  # training seasons the best fixed schedule is fitted on
FIT_EVALUATIONS = 60
HINDSIGHT_EVALUATIONS = 40


@dataclass
class SeasonRun:
    """One season under one method."""

    grain_kg_ha: float
    n_applied_kg_ha: float
    profit_usd_ha: float
    doses: list[float]  # per day
    trace: list[dict]  # state per day

    @property
    def nue(self) -> float | None:
        """Agronomic N use efficiency is relative to no N; here the partial factor productivity (kg grain / kg N)."""
        return self.grain_kg_ha / self.n_applied_kg_ha if self.n_applied_kg_ha > 0 else None


def run_schedule(plant: CropSimPlant, seed: int, schedule: Schedule | None, config: CropTaskConfig) -> SeasonRun:
    """Season `seed` on `plant` with `schedule` (None: no N) under the task's rules: a
    split whose trigger comes before the first development stage allowed waits for it."""
    plant.reset(seed)
    done = [False] * (len(schedule.at) if schedule else 0)
    while not plant.season.done:
        state, applied = plant.season.state(), plant.season.applied
        dose = 0.0
        if schedule and config.first_application_dvs <= state["dvs"] <= config.last_application_dvs:
            clock = state["dvs"] if schedule.trigger == "dvs" else plant.season.days
            for i, (at, amount) in enumerate(zip(schedule.at, schedule.doses)):
                if not done[i] and clock >= at:
                    done[i] = True
                    dose += amount
        dose = min(dose, config.max_dose_kg_ha, max(0.0, config.season_cap_kg_ha - applied))
        plant.write_knobs(np.array([dose if dose >= config.min_dose_kg_ha else 0.0]))
    return season_result(plant, config)


def run_target_rule(plant: CropSimPlant, seed: int, target_kg_ha: float, config: CropTaskConfig) -> SeasonRun:
    """Season `seed` on `plant` holding the soil mineral-N pool at `target_kg_ha` through the
    task's own soil-N-target action (the same dose arithmetic and rules as the agent's)."""
    rule = config.model_copy(update={"action": "soil_n_target"})
    action = soil_n_target_action(rule, target_kg_ha)
    plant.reset(seed)
    run_episode(CropTask(rule), plant, lambda _: action, seed=seed)
    return season_result(plant, config)


def fit_target_rule(setup: CropSetup, errors: CropErrors, seeds, config: CropTaskConfig,
                    crop_dir=None) -> tuple[float, float]:
    """The soil mineral-N level maximising the mean profit over `seeds` (bounded Brent to
    1 kg N/ha); (level, mean profit)."""
    plant = CropSimPlant(setup, errors, crop_dir)

    def loss(target):
        return -float(np.mean([run_target_rule(plant, s, target, config).profit_usd_ha for s in seeds]))

    best = minimize_scalar(loss, bounds=(0.0, config.soil_n_target_max_kg_ha), method="bounded", options={"xatol": 1.0})
    return round(float(best.x), 1), -float(best.fun)


def season_result(plant: CropSimPlant, config: CropTaskConfig) -> SeasonRun:
    grain = plant.season.variable("TWSO")
    applied = plant.season.applied
    return SeasonRun(grain, applied, config.grain_price * grain - config.n_cost * applied, list(plant.doses),
                     list(plant.trace))


def _mean_profit(doses, setup: CropSetup, errors: CropErrors, seeds, config: CropTaskConfig, crop_dir) -> float:
    plant = CropSimPlant(setup, errors, crop_dir)
    schedule = setup.expert.with_doses(np.clip(doses, 0.0, config.max_dose_kg_ha))
    return float(np.mean([run_schedule(plant, s, schedule, config).profit_usd_ha for s in seeds]))


def optimise_doses(setup: CropSetup, errors: CropErrors, seeds, config: CropTaskConfig, start=None,
                   evaluations: int = FIT_EVALUATIONS, crop_dir=None) -> tuple[Schedule, float]:
    """The expert's splits with doses maximising the mean profit over `seeds` (bounded
    Powell from the better of `start` (default the expert's doses) and those doses scaled
    to fill the seasonal cap, at most `evaluations` schedule evaluations in all);
    (schedule, mean profit)."""
    given = np.asarray(start if start is not None else setup.expert.doses, dtype=float)
    filled = np.clip(given * config.season_cap_kg_ha / max(given.sum(), 1e-9), 0.0, config.max_dose_kg_ha)
    candidates = [(-_mean_profit(x, setup, errors, seeds, config, crop_dir), i, x) for i, x in enumerate((given, filled))]
    f0, _, x0 = min(candidates, key=lambda c: c[:2])
    bounds = [(0.0, config.max_dose_kg_ha)] * len(x0)
    best = {"x": x0, "f": f0}
    evaluations -= len(candidates)

    def objective(x):
        f = -_mean_profit(x, setup, errors, seeds, config, crop_dir)
        if f < best["f"]:
            best.update(x=np.array(x), f=f)
        return f

    minimize(objective, x0, method="Powell", bounds=bounds, options={"maxfev": evaluations, "xtol": 1.0, "ftol": 1e-4})
    return setup.expert.with_doses(np.clip(best["x"], 0.0, config.max_dose_kg_ha)), -best["f"]


def _hindsight_one(args) -> tuple[list[float], float]:
    setup, errors, seed, config, start, evaluations, crop_dir = args
    schedule, profit = optimise_doses(setup, errors, [seed], config, start, evaluations, crop_dir)
    return list(schedule.doses), profit


def hindsight(setup: CropSetup, errors: CropErrors, seeds, config: CropTaskConfig, start=None,
              evaluations: int = HINDSIGHT_EVALUATIONS, workers: int = 2, crop_dir=None) -> list[Schedule]:
    """Per season, the split doses optimised knowing the season (in `workers` processes)."""
    jobs = [(setup, errors, int(s), config, start, evaluations, crop_dir) for s in seeds]
    if workers <= 1 or len(jobs) == 1:
        results = [_hindsight_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            results = list(pool.map(_hindsight_one, jobs))
    return [setup.expert.with_doses(doses) for doses, _ in results]


def main(argv: list[str] | None = None) -> None:
    """``python -m simulators.crop.baselines fit --setup wheat``: fit and store the best fixed
    schedule; ``fit-target``: the target rule's level (stored in the same file)."""
    parser = argparse.ArgumentParser(prog="python -m simulators.crop.baselines")
    parser.add_argument("command", choices=["fit", "fit-target"])
    parser.add_argument("--setup", default="wheat")
    parser.add_argument("--seasons", type=int, default=FIT_SEASONS)
    parser.add_argument("--evaluations", type=int, default=FIT_EVALUATIONS)
    args = parser.parse_args(argv)
    from .definition import CropDefinition, store_best_fixed, store_target_rule

    definition = CropDefinition()
    setup = definition.load_setup(args.setup)
    config = definition.task_config(setup)
    seeds = list(range(args.seasons))
    if args.command == "fit-target":
        level, profit = fit_target_rule(setup, definition.load_errors("train"), seeds, config)
        path = store_target_rule(setup, level, {"errors": "train", "seeds": f"0-{args.seasons - 1}",
                                                "mean_profit_usd_ha": round(profit, 1)})
        print(f"target rule: soil mineral N held at {level} kg N/ha, mean profit {profit:.1f} $/ha on {args.seasons} "
              f"training seasons; written to {path}")
        return
    schedule, profit = optimise_doses(setup, definition.load_errors("train"), seeds, config, evaluations=args.evaluations)
    path = store_best_fixed(setup, schedule, {"errors": "train", "seeds": f"0-{args.seasons - 1}",
                                              "evaluations": args.evaluations, "mean_profit_usd_ha": round(profit, 1)})
    print(f"best fixed {schedule.trigger} {list(schedule.at)}: {list(schedule.doses)} kg N/ha, mean profit "
          f"{profit:.1f} $/ha on {args.seasons} training seasons; written to {path}")


if __name__ == "__main__":
    main()
