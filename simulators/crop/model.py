"""A field season on WOFOST 8.1 (PCSE), water- and nitrogen-limited, one day at a time,
with nitrogen doses decided day by day.

Nitrogen goes in through PCSE's own signal path, at the point of the day where the
agromanager sends its timed events: after the states are integrated and before the rates
are computed. Sent between two ``Engine.run(1)`` calls (the obvious API route) a dose is
lost: the day's rates were already computed without it, and the engine zeroes the
fertiliser rate after integrating them (measured: 40 kg N/ha sent that way never reached
the mineral-N pool). :class:`NitrogenEngine` injects the dose where a timed event would,
so a season driven day by day equals PCSE's batch run of the same agromanagement
(``tests/simulators/test_crop_model.py``).

Crop parameters are the WOFOST_crop_parameters YAML files (winter wheat calibrated,
maize uncalibrated upstream), read from a directory given by the caller or by
``TBSAC_CROP_PARAMETERS``; they are not shipped with tbsac. Weather: PCSE's bundled CABO
files (station NL1, 1976-1999) or the user's own CABO or CSV file.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from core.config import ConfigError

CROP_PARAMETERS_ENV = "TBSAC_CROP_PARAMETERS"
CONFIG_FILE = Path(__file__).with_name("wofost81_cnb.conf")
BUNDLED_STATION = "NL1"
BUNDLED_YEARS = range(1976, 2000)  # NL1.976 .. NL1.999 ship with PCSE


class Soil(BaseModel):
    """Soil water parameters of the classic water balance (PCSE's dummy soil by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    SMFCF: PositiveFloat = 0.3  # field capacity
    SM0: PositiveFloat = 0.4  # porosity
    SMW: PositiveFloat = 0.1  # wilting point
    RDMSOL: PositiveFloat = 120.0  # maximum rooting depth (cm)
    CRAIRC: PositiveFloat = 0.06
    K0: PositiveFloat = 10.0
    SOPE: PositiveFloat = 10.0
    KSUB: PositiveFloat = 10.0


class Site(BaseModel):
    """Site and soil-nitrogen parameters of the classic N balance."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    WAV: float = Field(10.0, ge=0, le=100, description="initial soil water (cm)")
    NAVAILI: float = Field(20.0, ge=0, le=250, description="initial mineral N available (kg/ha)")
    NSOILBASE: float = Field(20.0, ge=0, le=100, description="soil N mineralised over the season (kg/ha)")
    NSOILBASE_FR: float = Field(0.025, ge=0, le=1, description="fraction of it released per day")
    BG_N_SUPPLY: float = Field(0.0, ge=0, le=0.1, description="deposition (kg/ha/day)")
    CO2: float = Field(360.0, ge=300, le=1400)


class FieldSeason(BaseModel):
    """One crop on one field in one season: crop, weather, soil, site, sowing."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    crop: Literal["wheat", "maize"] = "wheat"
    variety: str = "Winter_wheat_102"
    sowing: dt.date = dt.date(1984, 10, 15)
    max_duration: PositiveInt = 330
    weather: str = Field(BUNDLED_STATION, description="bundled station name or a CABO/CSV weather file")
    soil: Soil = Soil()
    site: Site = Site()
    n_recovery: float = Field(0.7, gt=0, le=1, description="share of a fertiliser dose that becomes available")


def crop_parameter_dir(path: str | Path | None = None) -> Path:
    """The WOFOST crop parameter directory: `path`, else ``$TBSAC_CROP_PARAMETERS``."""
    chosen = path or os.environ.get(CROP_PARAMETERS_ENV)
    if not chosen:
        raise ConfigError(f"WOFOST 8.1 crop parameters: none given; set {CROP_PARAMETERS_ENV} to a directory of "
                          "WOFOST_crop_parameters YAML files (wheat.yaml, maize.yaml)")
    directory = Path(chosen)
    if not any((directory / f"{c}.yaml").is_file() for c in ("wheat", "maize")):
        raise ConfigError(f"WOFOST 8.1 crop parameters: {directory} holds neither wheat.yaml nor maize.yaml")
    return directory


@functools.lru_cache(maxsize=8)
def _indexed(directory: Path) -> str:
    """PCSE reads every crop its ``crops.yaml`` lists: a private index of the crops present."""
    index = Path(tempfile.mkdtemp(prefix="tbsac-crops-"))
    present = [c for c in ("wheat", "maize") if (directory / f"{c}.yaml").is_file()]
    for crop in present:
        (index / f"{crop}.yaml").symlink_to((directory / f"{crop}.yaml").resolve())
    (index / "crops.yaml").write_text("available_crops:\n" + "".join(f"  - {c}\n" for c in present))
    return str(index)


@functools.lru_cache(maxsize=4)
def crop_data(directory: Path):
    """PCSE's crop data provider over the parameter directory (read once per process)."""
    from pcse.input import YAMLCropDataProvider

    return YAMLCropDataProvider(fpath=_indexed(directory))


@functools.lru_cache(maxsize=16)
def weather_provider(source: str):
    """A bundled station (PCSE's test data) or a CABO / CSV weather file."""
    import pcse
    from pcse.input import CABOWeatherDataProvider, CSVWeatherDataProvider

    if source == BUNDLED_STATION:
        return CABOWeatherDataProvider(BUNDLED_STATION, fpath=str(Path(pcse.__file__).parent / "tests" / "test_data"))
    path = Path(source)
    if path.suffix.lower() == ".csv" and path.is_file():
        return CSVWeatherDataProvider(str(path))
    # CABO: one file per year, <station>.<last three digits of the year>; given as <dir>/<station>
    if any(path.parent.glob(f"{path.name}.[0-9][0-9][0-9]")):
        return CABOWeatherDataProvider(path.name, fpath=str(path.parent))
    raise ConfigError(f"weather {source!r}: not the bundled station {BUNDLED_STATION}, a CSV file, nor a CABO station "
                      "(<dir>/<station> with files <station>.976, ...)")


def agromanagement(field: FieldSeason, doses: dict[dt.date, float] | None = None) -> list:
    """PCSE's agromanagement of the season: sowing at the campaign start, harvest at
    maturity, and `doses` (kg N/ha by date) as timed ``apply_n`` events."""
    events = None
    if doses:
        events = [{"event_signal": "apply_n", "name": "nitrogen", "comment": "tbsac",
                   "events_table": [{day: {"N_amount": float(kg), "N_recovery": field.n_recovery}}
                                    for day, kg in sorted(doses.items()) if kg > 0]}]
    return [{field.sowing: {
        "CropCalendar": {"crop_name": field.crop, "variety_name": field.variety, "crop_start_date": field.sowing,
                         "crop_start_type": "sowing", "crop_end_date": None, "crop_end_type": "maturity",
                         "max_duration": field.max_duration},
        "TimedEvents": events, "StateEvents": None}}]


def parameters(field: FieldSeason, crop_dir: Path):
    from pcse.base import ParameterProvider
    from pcse.input import WOFOST81SiteDataProvider_Classic

    crops = crop_data(crop_dir)
    crops.set_active_crop(field.crop, field.variety)
    return ParameterProvider(cropdata=crops, soildata=field.soil.model_dump(),
                             sitedata=WOFOST81SiteDataProvider_Classic(**field.site.model_dump()))


@functools.lru_cache(maxsize=1)
def _quiet_pcse() -> None:
    """PCSE's logging setup passes every component's DEBUG message of every day to the
    root logger (and INFO to a file): ~30 records a day, ~20 % of a day's time."""
    import logging

    logging.getLogger("pcse").setLevel(logging.WARNING)


def _engine_class():
    from pcse import signals
    from pcse.engine import Engine

    _quiet_pcse()

    class NitrogenEngine(Engine):
        """PCSE's engine with a dose for today, sent where the agromanager sends timed events."""

        pending_n = 0.0
        n_recovery = 0.7
        final_soil = None  # PCSE's engine refuses attributes its class does not declare

        def _run(self):
            # Engine._run's order (PCSE 6): integrate, drivers, agromanagement, rates.
            self.day, delt = self.timer()
            self.integrate(self.day, delt)
            self.drv = self._get_driving_variables(self.day)
            self.agromanager(self.day, self.drv)
            if self.pending_n > 0:
                self._send_signal(signal=signals.apply_n, N_amount=self.pending_n, N_recovery=self.n_recovery)
            self.pending_n = 0.0
            self.calc_rates(self.day, self.drv)
            if self.flag_terminate is True:
                self._terminate_simulation(self.day)

        def _terminate_simulation(self, day):
            # the soil's books as the season ends (the crop's are in the summary output)
            self.final_soil = {name: self.get_variable(name) for name in ("NSOIL", "NAVAIL")}
            super()._terminate_simulation(day)

    return NitrogenEngine


class Season:
    """A season stepped one day at a time: ``step(dose)`` applies `dose` kg N/ha on
    :attr:`day` and advances to the next day. Keeps the field's nitrogen books."""

    def __init__(self, field: FieldSeason, crop_dir: str | Path | None = None):
        self.field = field
        crop_dir = crop_parameter_dir(crop_dir)
        from pcse.exceptions import WeatherDataProviderError

        try:
            self.engine = _engine_class()(parameters(field, crop_dir), weather_provider(field.weather),
                                          agromanagement(field), config=str(CONFIG_FILE))
        except WeatherDataProviderError as exc:
            raise ConfigError(f"weather {field.weather!r}, season sown {field.sowing}: {exc}") from None
        self.engine.n_recovery = field.n_recovery
        self.applied = 0.0  # kg N/ha sent as fertiliser
        self.integrated = 0.0  # of which the model has integrated into the pool (a dose enters the day after)
        self.days = 0
        self._nsoil0 = self.engine.get_variable("NSOIL")
        self._navail0 = self.engine.get_variable("NAVAIL")

    @property
    def day(self) -> dt.date:
        """The day the next dose is applied on."""
        return self.engine.day + dt.timedelta(days=1)

    @property
    def done(self) -> bool:
        return bool(self.engine.flag_terminate)

    def step(self, dose_kg_ha: float = 0.0) -> None:
        if self.done:
            raise RuntimeError("the season has ended")
        dose = float(dose_kg_ha)
        if not dose >= 0:
            raise ValueError(f"N dose must be >= 0 kg/ha, got {dose_kg_ha}")
        from pcse.exceptions import WeatherDataProviderError

        self.engine.pending_n = dose
        self.integrated = self.applied  # yesterday's dose is integrated in this step, today's in the next
        self.applied += dose
        try:
            self.engine.run(1)
        except WeatherDataProviderError as exc:
            raise ConfigError(f"weather {self.field.weather!r}, season sown {self.field.sowing}: {exc}") from None
        self.days += 1

    def variable(self, name: str, default: float = 0.0) -> float:
        """A model variable today; after the season, its value at the end (summary output)."""
        if self.done:
            final = {**(self.engine.get_summary_output() or [{}])[-1], **(self.engine.final_soil or {})}
            value = final.get(name)
        else:
            value = self.engine.get_variable(name)
        return default if value is None else float(value)

    def state(self) -> dict[str, float]:
        """Today's crop and soil state (0 before emergence) and weather."""
        drv = self.engine.drv
        return {"dvs": self.variable("DVS", -1.0), "lai": self.variable("LAI"), "biomass_kg_ha": self.variable("TAGP"),
                "grain_kg_ha": self.variable("TWSO"), "crop_n_kg_ha": self.variable("NuptakeTotal"),
                "soil_n_kg_ha": self.variable("NAVAIL"), "rain_cm": float(drv.RAIN), "temp_c": float(drv.TEMP)}

    def n_balance(self) -> dict[str, float]:
        """The mineral-N books since the start (kg N/ha): what came in equals what went
        out plus the change in the available pool (``residual`` is the mismatch). A dose
        enters the pool when its day is integrated, at the next step: until then it is
        ``in_transit`` (a dose on the season's last day never enters)."""
        released = self._nsoil0 - self.variable("NSOIL")
        deposited = self.field.site.BG_N_SUPPLY * self.days
        lost = self.integrated * (1.0 - self.field.n_recovery)
        uptake = self.variable("NuptakeTotal")
        change = self.variable("NAVAIL") - self._navail0
        inputs = self.integrated + released + deposited
        return {"applied": self.applied, "in_transit": self.applied - self.integrated, "released_from_soil": released,
                "deposited": deposited, "uptake": uptake, "pool_change": change, "lost": lost,
                "residual": inputs - (uptake + change + lost)}
