"""Crop nitrogen management as a task: one step = one day from sowing to harvest.

The plant (:class:`CropSimPlant`) is a field on WOFOST 8.1 (:mod:`.model`). One knob,
today's nitrogen dose in kg N/ha (the applicator delivers it on the day the next write
runs); readings as a field station and the farm's records report them: days since
sowing, development stage, leaf area index, above-ground biomass, crop N, soil mineral
N, today's rain and temperature, N applied so far (what the applicator delivered),
grain and a harvested flag. Each write runs one day.

- observation: the trend state generalised: for each of development stage, LAI,
  biomass, crop N and soil mineral N its value and its change over the last
  ``trend_days``; rain (sum) and temperature (mean) over those days; N applied as a
  share of the seasonal cap; days since sowing; the last dose;
- action ``a in [-1, 1]``, as the config's ``action`` says: ``dose``, today's dose
  ``max(a, 0) x max_dose`` (half the action range is "no N today", so most days cost
  nothing); or ``soil_n_target``, the soil mineral N wanted today, ``(a + 1) / 2 x
  soil_n_target_max``, today's dose being what fills the pool up to it (``/ n_recovery``;
  none if the pool holds enough); ``soil_n_level_change``, a daily move of the level the
  pool is held at; or ``soil_n_season_level``, the level held all season, set by the
  sowing day's action (as a target is mapped) and deaf to later actions: a season's
  profit depends on the total it spreads, not on when, so one decision is what the
  target family has to make. Either way doses below ``min_dose`` are not spread,
  none outside development stages ``first_application_dvs`` to ``last_application_dvs``,
  none above ``max_dose``, and the seasonal cap is never exceeded;
- reward: economic. Each day ``- N cost x N applied that day``; at harvest ``+ grain price
  x grain yield - residual soil N x penalty``; plus potential-based shaping (Ng et al.
  1999) valuing the standing biomass at ``shaping_grain_per_biomass`` kg grain per kg:
  growth answers a dose within days while the yield pays months later; the shaping
  telescopes, so the optimal policy is the unshaped one;
- privileged features (training only, for the critics of an asymmetric actor-critic):
  the weather to come and the field's hidden parameters, which the actor never sees.

The error model (presets ``train`` and ``test``) draws the season: weather year (train
and test years disjoint), soil water parameters, initial soil mineral N, the soil's N
release over the season and the sowing date.
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from gymnasium import spaces
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from core.config import reading_positions
from core.plant import KnobSpec, Plant, ReadingSpec, Readings, SimulatedPlant
from core.task import MetricSpec, Outcome, Task

from .model import BUNDLED_STATION, FieldSeason, Season, Site, Soil

READINGS = (  # name, unit, lower, upper: the field's readings, in this order
    ("day", "day", -1.0, 1000.0), ("dvs", "1", -1.0, 3.0), ("lai", "m2/m2", -1.0, 20.0),
    ("biomass", "kg/ha", -1.0, 50_000.0), ("crop_n", "kg N/ha", -1.0, 1000.0), ("soil_n", "kg N/ha", -1.0, 2000.0),
    ("rain", "mm/day", -1.0, 500.0), ("temp", "degC", -60.0, 60.0), ("applied", "kg N/ha", -1.0, 5000.0),
    ("grain", "kg/ha", -1.0, 50_000.0), ("harvested", "1", -1.0, 2.0))
# Ranges are wider than any value (the safety layer calls a reading at its range's edge
# saturated): -1 below the quantities that cannot be negative.
READING_NAMES = tuple(r[0] for r in READINGS)


class Schedule(BaseModel):
    """A fixed split schedule: dose `doses[i]` on the first day trigger `at[i]` is met,
    counted in development stage (``dvs``) or days after planting (``dap``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    trigger: str = Field("dvs", pattern="^(dvs|dap)$")
    at: tuple[float, ...]
    doses: tuple[NonNegativeFloat, ...]

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.at) != len(self.doses) or not self.at:
            raise ValueError(f"schedule: {len(self.at)} trigger(s) and {len(self.doses)} dose(s); one dose per trigger")
        return self

    def with_doses(self, doses) -> "Schedule":
        return self.model_copy(update={"doses": tuple(round(float(d), 2) for d in doses)})


class CropSetup(BaseModel):
    """A crop on a farm: crop and variety, weather station, sowing, the applicator's
    limits, the rules of the season and the expert's split schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    crop: str = Field("wheat", pattern="^(wheat|maize)$")
    variety: str = "Winter_wheat_102"
    weather: str = BUNDLED_STATION
    sowing_month: int = Field(10, ge=1, le=12)
    sowing_day: int = Field(15, ge=1, le=28)
    max_duration: PositiveInt = 330
    max_dose_kg_ha: PositiveFloat = Field(100.0, description="largest dose in one application")
    min_dose_kg_ha: NonNegativeFloat = Field(5.0, description="smaller doses are not spread")
    season_cap_kg_ha: PositiveFloat = Field(250.0, description="seasonal N cap")
    first_application_dvs: float = Field(0.1, description="no application before this development stage (a winter "
                                         "crop: before spring growth, as the closed period for spreading N requires)")
    last_application_dvs: float = Field(1.0, description="no application after this development stage")
    n_recovery: float = Field(0.7, gt=0, le=1)
    soil: Soil = Soil()
    site: Site = Site()
    expert: Schedule
    best_fixed: Schedule | None = Field(None, description="the expert's splits with doses optimised on training seasons "
                                        "(python -m simulators.crop.baselines fit; read from <setup>.best-fixed.json)")
    target_rule_kg_ha: NonNegativeFloat | None = Field(
        None, description="the soil mineral-N level a fixed rule holds from the first to the last development stage, "
        "fitted on training seasons (python -m simulators.crop.baselines fit-target; read from <setup>.best-fixed.json)")


class CropErrors(BaseModel):
    """What varies from season to season: the weather year and the field.

    Season `seed` is weather year ``years[seed mod len(years)]``; the field is drawn from
    a generator seeded by (seed, the preset): soil water capacity, initial soil mineral N,
    the soil's N release, initial soil water and a sowing date shift."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "custom"
    years: tuple[int, ...] = Field(min_length=1, description="sowing years")
    initial_n_kg_ha: tuple[float, float] = (10.0, 80.0)
    soil_n_release_kg_ha: tuple[float, float] = (10.0, 60.0)
    field_capacity: tuple[float, float] = (0.25, 0.35)
    initial_water_cm: tuple[float, float] = (5.0, 20.0)
    sowing_shift_days: tuple[int, int] = (-14, 14)


PRESETS = {
    # NL1's bundled years 1976-1999 (a winter crop sown in 1976-1998) less those with gaps
    # in the weather (1990-01-17/18, 1990-09-17/18, 1991-09-01 to 12-31: sowings of 1989-1991);
    # the last seven held out.
    "train": CropErrors(name="train", years=tuple(range(1976, 1989))),
    "test": CropErrors(name="test", years=tuple(range(1992, 1999))),
}


def draw_field(setup: CropSetup, errors: CropErrors, seed: int) -> FieldSeason:
    """Season `seed` of `errors` on `setup`'s farm (reproducible)."""
    year = errors.years[int(seed) % len(errors.years)]
    rng = np.random.default_rng([int(seed), zlib.crc32(errors.name.encode())])
    u = lambda bounds: float(rng.uniform(*bounds))  # noqa: E731
    fc = u(errors.field_capacity)
    soil = setup.soil.model_copy(update={"SMFCF": round(fc, 4), "SM0": round(fc + 0.1, 4)})
    site = setup.site.model_copy(update={"NAVAILI": round(u(errors.initial_n_kg_ha), 2),
                                         "NSOILBASE": round(u(errors.soil_n_release_kg_ha), 2),
                                         "WAV": round(u(errors.initial_water_cm), 2)})
    shift = int(rng.integers(errors.sowing_shift_days[0], errors.sowing_shift_days[1] + 1))
    sowing = dt.date(year, setup.sowing_month, setup.sowing_day) + dt.timedelta(days=shift)
    return FieldSeason(crop=setup.crop, variety=setup.variety, sowing=sowing, max_duration=setup.max_duration,
                       weather=setup.weather, soil=soil, site=site, n_recovery=setup.n_recovery)


class CropSimPlant(SimulatedPlant):
    """A simulated field, one day per write (``reset(seed)`` sows season `seed`).

    Fault (the virtual IOC's ``SIM:`` PV): ``APPLICATOR_FAULT`` (non-zero: the spreader
    delivers nothing and reports it, interlock ``applicator_ok``). After harvest a write
    runs no day (the readings stay those of the harvest)."""

    faults = ("APPLICATOR_FAULT",)
    period_s = 1.0  # served by the virtual IOC a day lasts 1 s by default (--day-s)

    def __init__(self, setup: CropSetup, errors: CropErrors, crop_dir=None):
        self.setup, self.errors, self.crop_dir = setup, errors, crop_dir
        self.knobs = [KnobSpec("dose", "kg N/ha", 0.0, setup.max_dose_kg_ha, setup.max_dose_kg_ha, 1e-6)]
        self.readings = [ReadingSpec(*r) for r in READINGS]
        self.season: Season | None = None
        self.field_season: FieldSeason | None = None
        self._weather: np.ndarray | None = None
        self.setpoint = 0.0
        self.applicator_fault = False
        self.doses: list[float] = []  # delivered, per day run
        self.trace: list[dict] = []  # the state after each day run

    def warm_up(self) -> None:
        self.reset(0)

    def reset(self, seed: int | None = None) -> None:
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        self.field_season = draw_field(self.setup, self.errors, seed)
        self.season = Season(self.field_season, self.crop_dir)
        self._weather = None  # the season's daily weather, read when the critics ask for it
        self.setpoint, self.applicator_fault = 0.0, False
        self.doses, self.trace = [], [self.season.state()]

    def weather_ahead(self, days: int) -> np.ndarray:
        """Rain (mm), radiation (MJ/m2) and mean temperature (degC) of the next `days` days
        (rows; NaN past the season's longest duration or the weather's end): what only a
        simulator knows, for the critics in training."""
        if self._weather is None:
            from pcse.exceptions import WeatherDataProviderError

            from .model import weather_provider

            station, sowing = weather_provider(self.field_season.weather), self.field_season.sowing
            rows = []
            for i in range(self.field_season.max_duration + 1):
                try:
                    w = station(sowing + dt.timedelta(days=i))
                except WeatherDataProviderError:  # past the data's end
                    break
                rows.append((10.0 * w.RAIN, w.IRRAD / 1e6, (w.TMIN + w.TMAX) / 2.0))
            self._weather = np.array(rows, dtype=float).reshape(-1, 3)
        ahead = np.full((days, 3), np.nan)
        rest = self._weather[self.season.days + 1: self.season.days + 1 + days]
        ahead[: len(rest)] = rest
        return ahead

    def set_fault(self, name: str, value: int) -> None:
        if name != "APPLICATOR_FAULT":
            super().set_fault(name, value)
        self.applicator_fault = bool(value)

    def read_knobs(self) -> np.ndarray:
        return np.array([self.setpoint])

    def write_knobs(self, values: np.ndarray) -> None:
        """Hold the dose setpoint and run one day with it (spread that day unless the applicator is faulty)."""
        self.setpoint = float(np.asarray(values, dtype=float)[0])
        if self.season.done:
            return
        dose = 0.0 if self.applicator_fault else max(0.0, self.setpoint)
        self.season.step(dose)
        self.doses.append(dose)
        self.trace.append(self.season.state())

    def read(self) -> Readings:
        s = self.season.state()
        values = np.array([self.season.days, s["dvs"], s["lai"], s["biomass_kg_ha"], s["crop_n_kg_ha"], s["soil_n_kg_ha"],
                           10.0 * s["rain_cm"], s["temp_c"], self.season.applied, s["grain_kg_ha"],
                           1.0 if self.season.done else 0.0])
        interlocks = {"applicator_ok": 0.0 if self.applicator_fault else 1.0}
        return Readings(values, self.now(len(values)), np.ones(len(values), dtype=bool), interlocks)


class CropTaskConfig(BaseModel):
    """Task parameters: the economics and the observation."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_steps: PositiveInt = 400  # days; a season ends at harvest
    grain_price: PositiveFloat = Field(0.158, description="$ per kg grain")
    n_cost: PositiveFloat = Field(0.79, description="$ per kg N")
    residual_n_penalty: NonNegativeFloat = Field(0.0, description="$ per kg mineral N left in the soil at harvest "
                                                 "(a leaching proxy; 0: off)")
    n_shadow_cost: NonNegativeFloat = Field(0.0, description="$ per kg N the reward charges on top of n_cost (N's "
                                            "cost to the environment: the agent's books, not the profit metric)")
    reward_scale: PositiveFloat = 1e-3  # $ -> reward
    shaping_grain_per_biomass: NonNegativeFloat = Field(0.45, description="shaping potential: kg grain per kg "
                                                        "standing biomass (0 switches shaping off)")
    shaping_gamma: float = Field(0.999, gt=0, le=1, description="the agent's discount, for exact potential-based shaping")
    trend_days: PositiveInt = Field(7, le=60)
    max_dose_kg_ha: PositiveFloat = 100.0
    min_dose_kg_ha: NonNegativeFloat = 5.0
    season_cap_kg_ha: PositiveFloat = 250.0
    first_application_dvs: float = 0.1
    last_application_dvs: float = 1.0
    action: Literal["dose", "soil_n_target", "soil_n_level_change", "soil_n_season_level"] = Field(
        "dose", description="what the action sets: 'dose', today's dose (max(a, 0) x max_dose); 'soil_n_target', the "
        "soil mineral N wanted today ((a + 1) / 2 x soil_n_target_max_kg_ha), today's dose filling the pool up to it; "
        "'soil_n_level_change', a change of the soil mineral-N level held from today on (a x level_change_max_kg_ha, "
        "from level_start_kg_ha each season; the level is observed), today's dose filling the pool up to it; "
        "'soil_n_season_level', the soil mineral-N level held all season, set by the season's first action (sowing "
        "day) as 'soil_n_target' maps it, later actions ignored, each day's dose filling the pool up to it")
    soil_n_target_max_kg_ha: PositiveFloat = 250.0
    level_start_kg_ha: NonNegativeFloat = Field(125.0, description="'soil_n_level_change': the level a season starts "
                                                "from (the middle of 0..soil_n_target_max_kg_ha)")
    level_change_max_kg_ha: PositiveFloat = Field(5.0, description="'soil_n_level_change': the largest change a day")
    n_recovery: float = Field(0.7, gt=0, le=1, description="share of a dose that reaches the mineral-N pool")

    @model_validator(mode="before")
    @classmethod
    def _season_level_defaults(cls, data):
        # One decision a season: its reward is the season's books in one step (shaping,
        # meant to pay growth within days of a dose, has nothing to bridge and, summed
        # undiscounted over the skipped days, would not telescope), on a scale where
        # a few $/ha between levels outweigh the entropy term. Unless given.
        if isinstance(data, dict) and data.get("action") == "soil_n_season_level":
            data = {"reward_scale": 0.1, "shaping_grain_per_biomass": 0.0, **data}
        return data


def soil_n_target_action(config: CropTaskConfig, level_kg_ha: float) -> np.ndarray:
    """The action asking for `level_kg_ha` of soil mineral N (the inverse of the task's
    ``soil_n_target`` mapping)."""
    return np.array([2.0 * level_kg_ha / config.soil_n_target_max_kg_ha - 1.0])


def profit_metric() -> MetricSpec:
    return MetricSpec("profit_usd_ha", "$/ha", higher_is_better=True, target=None, label="grain value - N cost")


METRICS = (profit_metric(), MetricSpec("grain_kg_ha", "kg/ha", True, None, "grain yield"),
           MetricSpec("n_applied_kg_ha", "kg N/ha", False, None, "N applied"))


def reading_indices(readings: list[ReadingSpec]) -> list[int]:
    """Positions of the readings the task needs (by name, any case); ConfigError naming the missing ones."""
    return reading_positions([r.name for r in readings], READING_NAMES, "crop")


TRENDED = ("dvs", "lai", "biomass", "crop_n", "soil_n")
PRIVILEGED_BLOCKS, PRIVILEGED_BLOCK_DAYS = 8, 30  # the critics' view of the weather to come: 8 x 30 days
TREND_SCALE = np.array([1.0, 5.0, 10_000.0, 100.0, 100.0])  # observation units


@dataclass
class CropTask(Task):
    """Field readings in, today's N dose out; the season's profit as reward.

    The books are kept from the readings (N the applicator reports delivered, grain at
    harvest), so a session on a real field counts what happened, not what was asked."""

    config: CropTaskConfig = field(default_factory=CropTaskConfig)
    indices: list[int] = field(default_factory=lambda: list(range(len(READINGS))))

    def __post_init__(self) -> None:
        c = self.config
        self.observation_space = spaces.Box(-np.inf, np.inf, (2 * len(TRENDED) + 5 + self._holds_level,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.metrics = METRICS
        self.max_steps = c.max_steps
        self.trained_step = np.array([c.max_dose_kg_ha])
        self.privileged_size = 3 * PRIVILEGED_BLOCKS + 4
        self.steps = 0
        self.settings = np.zeros(1)
        self.history: list[np.ndarray] = []
        self.initial_readings = self._last = np.zeros(len(READINGS))
        self.level = c.level_start_kg_ha

    @property
    def _holds_level(self) -> bool:
        return self.config.action == "soil_n_level_change"

    def next_level(self, action: np.ndarray) -> float:
        """The soil mineral-N level the pool is filled to after `action`: the target asked
        ('soil_n_target', and 'soil_n_season_level' on the season's first day), the level
        moved ('soil_n_level_change'), else the level held."""
        c = self.config
        a = float(np.clip(np.asarray(action, dtype=float)[0], -1.0, 1.0))
        if c.action == "soil_n_target" or (c.action == "soil_n_season_level" and self.steps == 0):
            return (a + 1.0) / 2.0 * c.soil_n_target_max_kg_ha
        if not self._holds_level:
            return self.level
        return min(max(self.level + a * c.level_change_max_kg_ha, 0.0), c.soil_n_target_max_kg_ha)

    def _values(self, readings: np.ndarray) -> dict[str, float]:
        picked = np.asarray(readings, dtype=float)[self.indices]
        return dict(zip(READING_NAMES, picked))

    def _observe(self) -> np.ndarray:
        c = self.config
        window = self.history[-(c.trend_days + 1):]
        now, then = window[-1], window[0]
        trended = np.array([now[READING_NAMES.index(n)] for n in TRENDED]) / TREND_SCALE
        before = np.array([then[READING_NAMES.index(n)] for n in TRENDED]) / TREND_SCALE
        rain = sum(w[READING_NAMES.index("rain")] for w in window[1:]) / 50.0 if len(window) > 1 else 0.0
        temp = np.mean([w[READING_NAMES.index("temp")] for w in window]) / 20.0
        v = self._values(self._last)
        tail = [rain, temp, v["applied"] / c.season_cap_kg_ha, v["day"] / 365.0, self.settings[0] / c.max_dose_kg_ha]
        if self._holds_level:
            tail.append(self.level / c.soil_n_target_max_kg_ha)
        return np.concatenate([trended, trended - before, tail]).astype(np.float32)

    def privileged(self, plant: CropSimPlant) -> np.ndarray:
        """For the critics in training: the weather to come (rain, radiation and mean
        temperature over each of the next 8 x 30 days) and the field's hidden parameters
        (the soil's N release, initial mineral N, field capacity, initial water). A season's
        profit varies by ~170 $/ha with them, nearby N levels by a few $/ha."""
        blocks = plant.weather_ahead(PRIVILEGED_BLOCKS * PRIVILEGED_BLOCK_DAYS).reshape(PRIVILEGED_BLOCKS, PRIVILEGED_BLOCK_DAYS, 3)
        # Days past the weather's end count as no rain and no sun; a block's temperature is
        # the mean of the days it has (0 if none), not diluted by them.
        known = np.isfinite(blocks[:, :, 2]).sum(1)
        temperature = np.where(known > 0, np.nansum(blocks[:, :, 2], 1) / np.maximum(known, 1), 0.0)
        weather = np.column_stack([np.nansum(blocks[:, :, 0], 1) / 100.0, np.nansum(blocks[:, :, 1], 1) / 300.0,
                                   temperature / 20.0])
        site, soil = plant.field_season.site, plant.field_season.soil
        hidden = [site.NSOILBASE / 60.0, site.NAVAILI / 80.0, soil.SMFCF / 0.3, site.WAV / 20.0]
        return np.concatenate([weather.ravel(), hidden]).astype(np.float32)

    def _potential(self, v: dict[str, float]) -> float:
        if v["harvested"] >= 0.5:
            return 0.0
        return self.config.grain_price * self.config.shaping_grain_per_biomass * v["biomass"]

    def start(self, plant: Plant) -> np.ndarray:
        self.steps = 0
        self.level = self.config.level_start_kg_ha
        self.initial_readings = self._last = np.asarray(plant.read().values, dtype=float)
        self.history = [self._last[self.indices]]
        self.settings = plant.read_knobs()
        return self._observe()

    def dose(self, action: np.ndarray, readings: dict[str, float] | None = None) -> float:
        """The dose the action asks for within the task's rules (minimum dose, last stage, cap)."""
        c, v = self.config, readings or self._values(self._last)
        if c.action != "dose":
            # A setpoint for the pool, not a dose: the pool is what the crop draws on, and
            # holding it is what adapts the season's total to the crop's uptake.
            dose = (self.next_level(action) - v["soil_n"]) / c.n_recovery
            dose = min(max(dose, 0.0), c.max_dose_kg_ha)
        else:
            dose = max(float(np.clip(np.asarray(action, dtype=float)[0], -1.0, 1.0)), 0.0) * c.max_dose_kg_ha
        dose = min(dose, max(0.0, c.season_cap_kg_ha - v["applied"]))
        if (dose < c.min_dose_kg_ha or not c.first_application_dvs <= v["dvs"] <= c.last_application_dvs
                or v["harvested"] >= 0.5):
            return 0.0
        return dose

    def reference_action(self) -> np.ndarray | None:
        """Hold the season's starting soil-N level (the level and target actions); none for the dose."""
        c = self.config
        if c.action == "dose":
            return None
        return np.zeros(1) if c.action == "soil_n_level_change" else soil_n_target_action(c, c.level_start_kg_ha)

    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        return np.array([self.dose(action)])

    def step(self, plant: Plant, action: np.ndarray):
        c = self.config
        before = self._values(self._last)
        plant.write_knobs(self.proposed_settings(action))
        self.level = self.next_level(action)
        self.settings = plant.read_knobs()
        self.steps += 1
        self._last = np.asarray(plant.read().values, dtype=float)
        self.history.append(self._last[self.indices])
        del self.history[: -(c.trend_days + 1)]
        after = self._values(self._last)
        harvested = after["harvested"] >= 0.5
        reward = -(c.n_cost + c.n_shadow_cost) * (after["applied"] - before["applied"])
        reward += c.shaping_gamma * self._potential(after) - self._potential(before)
        if harvested:
            reward += c.grain_price * after["grain"] - c.residual_n_penalty * after["soil_n"]
        done = harvested or self.steps >= self.max_steps
        info = {**self.metric_values(), "success": bool(harvested), "harvested": bool(harvested)}
        return self._observe(), float(c.reward_scale * reward), bool(harvested), bool(done and not harvested), info

    # -- metrics ---------------------------------------------------------------------
    def measure(self, readings: np.ndarray) -> dict[str, float]:
        v, c = self._values(readings), self.config
        return {"profit_usd_ha": c.grain_price * v["grain"] - c.n_cost * v["applied"], "grain_kg_ha": v["grain"],
                "n_applied_kg_ha": v["applied"]}

    @property
    def last_readings(self) -> np.ndarray:
        return self._last.copy()

    @property
    def ended(self) -> bool:
        return self._values(self._last)["harvested"] >= 0.5

    def outcome(self, initial: float, final: float, info: dict | None) -> Outcome:
        # Whatever happened, the applicator stops when the agent lets go of it.
        if self.ended:
            return Outcome(True, "completed", restore_reason=f"season harvested (profit {final:.0f} $/ha); "
                           "the dose goes back to zero")
        return Outcome(False, "not_converged", restore_reason="the season was not run to harvest")
