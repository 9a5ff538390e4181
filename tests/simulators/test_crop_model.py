"""The crop season on WOFOST 8.1 (PCSE): doses decided day by day reach the soil's
mineral-N pool, the N books close, a season stepped day by day is PCSE's own batch run,
and yield answers nitrogen the way an N-limited crop does."""

import datetime as dt

import pytest

from simulators.crop.model import (FieldSeason, Season, Site, agromanagement, crop_parameter_dir, parameters,
                                   weather_provider)

CROP_DIR = None  # from TBSAC_CROP_PARAMETERS (tests/conftest.py points it at ../shared/data/wofost81)
SPRING = (dt.date(1985, 3, 20), dt.date(1985, 4, 25), dt.date(1985, 5, 20))


def run(season: Season, doses: dict) -> Season:
    while not season.done:
        season.step(doses.get(season.day, 0.0))
    return season


def test_every_dose_reaches_the_pool_and_the_n_books_close_every_day():
    field = FieldSeason()
    with_n, without = Season(field), Season(field)
    checked, watching = 0, None
    while not with_n.done:
        dose = 50.0 if with_n.day in SPRING else 0.0
        gap = with_n.variable("NAVAIL") + with_n.variable("NuptakeTotal") - without.variable("NAVAIL") - without.variable("NuptakeTotal")
        with_n.step(dose)
        without.step(0.0)
        if watching is not None:  # a dose applied on day D is in the pool once day D is integrated
            after = with_n.variable("NAVAIL") + with_n.variable("NuptakeTotal") - without.variable("NAVAIL") - without.variable("NuptakeTotal")
            assert after - watching[1] == pytest.approx(watching[0] * field.n_recovery, abs=0.1)
            checked += 1
        watching = (dose, gap) if dose else None
        assert abs(with_n.n_balance()["residual"]) < 0.1
    books = with_n.n_balance()
    assert checked == 3 and books["applied"] == 150.0 and abs(books["residual"]) < 0.1
    assert books["uptake"] > without.n_balance()["uptake"] + 20  # the crop took some of it up


def test_a_dose_sent_between_engine_steps_is_lost_which_is_why_the_season_injects_it():
    """PCSE's pitfall, pinned: the signal sent between two run(1) calls never reaches the pool."""
    from pcse import signals
    from pcse.engine import Engine
    from simulators.crop.model import CONFIG_FILE

    field = FieldSeason()
    engine = Engine(parameters(field, crop_parameter_dir(CROP_DIR)), weather_provider(field.weather),
                    agromanagement(field), config=str(CONFIG_FILE))
    engine.run(150)
    before = engine.get_variable("NAVAIL")
    engine._send_signal(signal=signals.apply_n, N_amount=40.0, N_recovery=0.7)
    engine.run(1)
    season = Season(field)
    for _ in range(150):
        season.step(0.0)
    season_before = season.variable("NAVAIL")
    season.step(40.0)
    season.step(0.0)
    assert engine.get_variable("NAVAIL") - before < 1.0  # lost
    assert season.variable("NAVAIL") - season_before > 20.0  # ours: 28 kg recovered, minus a day's uptake


def test_a_season_stepped_day_by_day_is_pcse_s_own_batch_run():
    from pcse.models import Wofost81_NWLP_CWB_CNB

    field = FieldSeason()
    doses = {SPRING[0]: 40.0, SPRING[1]: 60.0}
    season = run(Season(field), doses)
    batch = Wofost81_NWLP_CWB_CNB(parameters(field, crop_parameter_dir(CROP_DIR)), weather_provider(field.weather),
                                  agromanagement(field, doses))
    batch.run_till_terminate()
    reference = batch.get_summary_output()[-1]
    assert season.variable("TWSO") == reference["TWSO"] and season.variable("TAGP") == reference["TAGP"]
    assert season.variable("NuptakeTotal") == reference["NuptakeTotal"] and season.days > 250


def test_yield_rises_with_nitrogen_on_an_n_limited_season_and_saturates():
    field = FieldSeason(site=Site(NAVAILI=10.0, NSOILBASE=10.0))
    grain = []
    for total in (0, 120, 240, 480, 600):
        doses = {day: total / 3 for day in SPRING}
        grain.append(run(Season(field), doses).variable("TWSO"))
    gains = [b - a for a, b in zip(grain, grain[1:])]
    assert all(g > -1e-6 for g in gains), grain  # never less grain for more N
    assert gains[0] > 2000  # N-limited: the first 120 kg pay
    assert gains[-1] < 0.1 * gains[0], grain  # and it saturates


def test_weather_from_a_cabo_station_directory_or_a_clear_refusal(tmp_path):
    from pathlib import Path

    import pcse

    from core.config import ConfigError

    station = Path(pcse.__file__).parent / "tests" / "test_data" / "NL1"
    assert weather_provider(str(station))(dt.date(1985, 4, 1)).TMAX == weather_provider("NL1")(dt.date(1985, 4, 1)).TMAX
    with pytest.raises(ConfigError, match="not the bundled station"):
        weather_provider(str(tmp_path / "nowhere"))
