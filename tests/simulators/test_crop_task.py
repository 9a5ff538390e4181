"""The crop task: the daily dose goes through the task into the soil and the books close,
the task's rules hold, the reward is the season's economics, seasons are drawn from
disjoint weather years, and the baselines do what they say."""

import datetime as dt

import numpy as np
import pytest

from core.config import ConfigError
from core.registry import get_task
from core.task import run_episode
from simulators.crop.baselines import optimise_doses, run_schedule, run_target_rule
from simulators.crop.model import weather_provider
from simulators.crop.task import PRESETS, PRIVILEGED_BLOCKS, CropTaskConfig, draw_field, soil_n_target_action


@pytest.fixture(scope="module")
def crop():
    definition = get_task("crop")
    setup = definition.load_setup("wheat")
    return definition, setup


def field(crop, errors="train"):
    definition, setup = crop
    plant = definition.sim_plant(setup, definition.load_errors(errors))
    return plant, definition.make_task(setup, plant.knobs, plant.readings, CropTaskConfig())


class DoseOn:
    """Asks for a fixed action on given days of the season, nothing otherwise."""

    def __init__(self, days: dict[int, float]):
        self.days, self.day = days, 0

    def __call__(self, obs):
        self.day += 1
        return np.array([self.days.get(self.day, -1.0)])


def test_doses_decided_through_the_task_reach_the_soil_and_the_n_books_close_every_day(crop):
    plant, task = field(crop)
    plant.reset(3)
    residuals = []
    policy = DoseOn({150: 0.3, 190: 0.6, 215: 0.45})  # 30, 60, 45 kg N/ha in spring

    def check(step):
        residuals.append(plant.season.n_balance()["residual"])

    result = run_episode(task, plant, policy, on_step=check)
    books = plant.season.n_balance()
    assert result.terminated and result.final["n_applied_kg_ha"] == pytest.approx(135.0)
    assert books["applied"] == pytest.approx(135.0) and books["in_transit"] == 0.0
    assert max(abs(r) for r in residuals) < 0.1
    assert sorted(d for d in plant.doses if d > 0) == pytest.approx([30.0, 45.0, 60.0])


def test_the_task_spreads_nothing_below_the_minimum_after_the_last_stage_or_beyond_the_cap(crop):
    plant, task = field(crop)
    plant.reset(0)
    task.start(plant)
    c = task.config
    sown = dict(task._values(task.last_readings))
    assert sown["dvs"] < c.first_application_dvs and task.dose(np.array([1.0])) == 0.0  # autumn: no N
    v = {**sown, "dvs": 0.5}  # spring
    assert task.dose(np.array([-0.3]), v) == 0.0 and task.dose(np.array([1.0]), v) == c.max_dose_kg_ha
    assert task.dose(np.array([0.03]), v) == 0.0  # 3 kg N/ha: below the applicator's minimum
    assert task.dose(np.array([1.0]), {**v, "applied": c.season_cap_kg_ha - 20}) == pytest.approx(20.0)
    assert task.dose(np.array([1.0]), {**v, "applied": c.season_cap_kg_ha - 2}) == 0.0
    assert task.dose(np.array([1.0]), {**v, "dvs": c.last_application_dvs + 0.01}) == 0.0
    result = run_episode(task, plant, lambda obs: np.array([1.0]))  # always the most: the cap holds
    assert result.final["n_applied_kg_ha"] == pytest.approx(c.season_cap_kg_ha)


def test_a_soil_n_target_fills_the_pool_up_to_it_within_the_same_rules(crop):
    plant, _ = field(crop)
    definition, setup = crop
    task = definition.make_task(setup, plant.knobs, plant.readings, CropTaskConfig(action="soil_n_target"))
    plant.reset(0)
    task.start(plant)
    c = task.config
    v = {**task._values(task.last_readings), "dvs": 0.5, "soil_n": 40.0}
    ask = lambda kg: np.array([2.0 * kg / c.soil_n_target_max_kg_ha - 1.0])  # noqa: E731
    # 40 kg in the pool, 110 wanted: 70 kg must arrive, a dose of 70 / recovery
    assert c.n_recovery == setup.n_recovery and task.dose(ask(110.0), v) == pytest.approx(70.0 / c.n_recovery)
    assert task.dose(ask(30.0), v) == 0.0 and task.dose(ask(42.0), v) == 0.0  # above the target; below the minimum
    assert task.dose(ask(250.0), v) == c.max_dose_kg_ha  # the applicator's largest dose
    assert task.dose(ask(110.0), {**v, "applied": c.season_cap_kg_ha - 20}) == pytest.approx(20.0)
    assert task.dose(ask(110.0), {**v, "dvs": c.last_application_dvs + 0.01}) == 0.0


def test_the_target_rule_holds_the_pool_and_adapts_the_seasons_total(crop):
    """One level, two seasons: the rule spreads what each crop drew from the pool, not a
    fixed amount; the pool sits at the level while doses may be spread, less at most one
    day's uptake (a dose reaches the pool the day after it is decided)."""
    definition, setup = crop
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    config = definition.task_config(setup)
    runs = [run_target_rule(plant, seed, 100.0, config) for seed in (0, 4)]
    for run in runs:
        pools = np.array([s["soil_n_kg_ha"] for s in run.trace[1:]
                          if config.first_application_dvs + 0.05 <= s["dvs"] <= config.last_application_dvs - 0.05])
        assert len(pools) > 20 and pools.min() > 100.0 - 15.0 and np.median(pools) > 95.0
        assert 0 < run.n_applied_kg_ha < config.season_cap_kg_ha
    assert abs(runs[0].n_applied_kg_ha - runs[1].n_applied_kg_ha) > 10.0
    assert setup.target_rule_kg_ha is not None  # fitted and shipped beside the setup


def spreads_as_the_target_rule(task, plant, policy, level: float, config: CropTaskConfig, seed: int = 3):
    """Season `seed` run by `policy` through `task` ends holding `level` and with the target
    rule's N and profit at that level; the rule's run."""
    plant.reset(seed)
    result = run_episode(task, plant, policy, seed=seed)
    assert task.level == pytest.approx(level)
    rule = run_target_rule(plant, seed, level, config)
    assert result.final["n_applied_kg_ha"] == pytest.approx(rule.n_applied_kg_ha)
    assert result.final["profit_usd_ha"] == pytest.approx(rule.profit_usd_ha)
    return rule


def test_a_level_change_moves_the_held_level_and_holding_it_is_the_target_rule(crop):
    """'soil_n_level_change': the action moves the level the pool is held at (observed,
    at most level_change_max a day, within 0..the target range, reset each season); a
    season that moves it to 110 early and then holds it spreads what the target rule
    at 110 spreads."""
    definition, setup = crop
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    config = definition.task_config(setup, CropTaskConfig(action="soil_n_level_change"))
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    assert task.observation_space.shape[0] == 16
    plant.reset(3)
    obs = task.start(plant)
    assert task.level == config.level_start_kg_ha and obs[-1] == pytest.approx(config.level_start_kg_ha / 250.0)
    assert task.next_level(np.array([-1.0])) == config.level_start_kg_ha - config.level_change_max_kg_ha
    assert task.next_level(np.array([0.4])) == pytest.approx(config.level_start_kg_ha + 0.4 * config.level_change_max_kg_ha)
    assert task.level == config.level_start_kg_ha  # asking is not moving
    task.level = 248.0
    assert task.next_level(np.array([1.0])) == 250.0
    task.level = 2.0
    assert task.next_level(np.array([-1.0])) == 0.0

    def down_to_110(o):  # winter days: no dose yet, the level still moves
        return np.array([-1.0 if o[-1] * 250.0 > 110.0 + 1e-9 else 0.0])

    spreads_as_the_target_rule(task, plant, down_to_110, 110.0, config)
    plant.reset(4)
    task.start(plant)
    assert task.level == config.level_start_kg_ha  # each season starts afresh


def test_a_season_level_is_set_by_the_first_action_and_held_as_the_target_rule_holds_it(crop):
    """'soil_n_season_level': the sowing day's action sets the level for the whole season
    (mapped as a soil-N target), every later action is ignored; the season spreads what
    the target rule at that level spreads, and the next season is set afresh."""
    definition, setup = crop
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    config = definition.task_config(setup, CropTaskConfig(action="soil_n_season_level"))
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    assert task.observation_space.shape[0] == 15
    first = soil_n_target_action(config, 80.0)
    days = iter(range(10_000))
    # Day 0 asks for 80; every later day asks for the cap's worth (ignored).
    policy = lambda _: first if next(days) == 0 else np.array([1.0])  # noqa: E731
    rule = spreads_as_the_target_rule(task, plant, policy, 80.0, config)
    assert rule.n_applied_kg_ha < config.season_cap_kg_ha - 10.0  # the ignored asks would have spread the cap
    plant.reset(4)
    task.start(plant)
    assert task.next_level(soil_n_target_action(config, 140.0)) == pytest.approx(140.0)
    # One step a season in training: the season's books in one reward, on a scale the
    # entropy term does not drown, unless the user gives them.
    assert (config.reward_scale, config.shaping_grain_per_biomass) == (0.1, 0.0)
    assert CropTaskConfig(action="soil_n_season_level", reward_scale=0.5).reward_scale == 0.5
    assert CropTaskConfig(action="soil_n_target").reward_scale == CropTaskConfig().reward_scale == 1e-3
    overrides = definition.training_overrides(config)
    assert overrides["action_repeat"] >= config.max_steps and overrides["paired_reference"] and overrides["keep_last"]


def test_a_paired_reference_pays_what_the_agent_changed_against_the_level_held_on_the_same_season(crop):
    """Training only: a twin field runs the reference (the starting level held) on the same
    season; each reward is the agent's minus the twin's. The reference itself earns 0 every
    day; another policy earns its own season's rewards minus the reference's."""
    from core.task import TaskEnv

    definition, setup = crop
    errors = definition.load_errors("train")
    config = definition.task_config(setup, CropTaskConfig(action="soil_n_level_change", n_shadow_cost=0.3))

    def env(paired: bool) -> TaskEnv:
        def pair():
            plant = definition.sim_plant(setup, errors)
            return plant, definition.make_task(setup, plant.knobs, plant.readings, config)
        return TaskEnv(*pair(), reference=pair() if paired else None)

    def season(e: TaskEnv, policy) -> list[float]:
        obs, _ = e.reset(seed=11)
        rewards, done = [], False
        while not done:
            obs, r, terminated, truncated, _ = e.step(policy(obs))
            rewards.append(r)
            done = terminated or truncated
        return rewards

    hold, lower = (lambda o: np.zeros(1)), (lambda o: np.array([-1.0 if o[-1] * 250.0 > 90.0 else 0.0]))
    assert np.abs(season(env(True), hold)).max() == 0.0
    paired, alone, reference = season(env(True), lower), season(env(False), lower), season(env(False), hold)
    assert len(paired) == len(alone) == len(reference)  # N does not move the crop's calendar
    np.testing.assert_allclose(paired, np.array(alone) - np.array(reference), atol=1e-12)
    assert abs(sum(paired)) > 1e-3  # 90 instead of 125 kg N/ha changes the season's books


@pytest.mark.parametrize("shadow", [0.0, 0.5])
def test_the_rewards_add_up_to_the_seasons_profit(crop, shadow):
    """With the agent's discount at 1 the shaping telescopes: sum of rewards = profit - potential at sowing
    (- N's shadow cost, which the reward charges and the profit does not)."""
    definition, setup = crop
    plant = definition.sim_plant(setup, definition.load_errors("train"))
    config = CropTaskConfig(shaping_gamma=1.0, n_shadow_cost=shadow)
    task = definition.make_task(setup, plant.knobs, plant.readings, config)
    plant.reset(1)
    rewards = []
    result = run_episode(task, plant, DoseOn({160: 0.6, 200: 0.6}), on_step=lambda s: rewards.append(s.reward))
    start = task._values(task.initial_readings)
    potential = config.grain_price * config.shaping_grain_per_biomass * start["biomass"]
    profit = result.final["profit_usd_ha"]
    assert profit == pytest.approx(config.grain_price * plant.season.variable("TWSO") - config.n_cost * 120.0)
    assert sum(rewards) / config.reward_scale == pytest.approx(profit - potential - shadow * 120.0, abs=0.01)
    assert result.terminated and not result.truncated  # harvest ends the season


def test_the_critics_privileged_features_are_the_weather_to_come_and_the_hidden_field(crop):
    """Training only: after the actor's observation, the next 8 x 30 days' rain, radiation
    and temperature (from the station's own records) and the field's drawn parameters."""
    from core.task import TaskEnv

    plant, task = field(crop)
    env, plain = TaskEnv(plant, task, privileged=True), TaskEnv(*field(crop))
    n = plain.observation_space.shape[0]
    obs, _ = env.reset(seed=4)
    assert obs.shape == env.observation_space.shape == (n + 28,)
    assert np.array_equal(obs[:n], plain.reset(seed=4)[0])  # the actor's part is the task's observation
    for _ in range(40):
        obs, *_ = env.step(np.array([-1.0]))
    station, day = weather_provider(plant.field_season.weather), plant.field_season.sowing + dt.timedelta(days=41)
    first = [station(day + dt.timedelta(days=i)) for i in range(30)]
    assert obs[n] == pytest.approx(sum(10 * w.RAIN for w in first) / 100, rel=1e-5)
    assert obs[n + 1] == pytest.approx(sum(w.IRRAD / 1e6 for w in first) / 300, rel=1e-5)
    assert obs[n + 2] == pytest.approx(np.mean([(w.TMIN + w.TMAX) / 2 for w in first]) / 20, rel=1e-5)
    assert obs[-4] == pytest.approx(plant.field_season.site.NSOILBASE / 60, rel=1e-5)  # the soil's N release
    # The last blocks run past the weather the season can use (its longest duration): a
    # block's temperature is the mean of its known days, a block without any reads 0.
    last = n + 3 * (PRIVILEGED_BLOCKS - 1)
    while plant.season.days < 105:
        obs, *_ = env.step(np.array([-1.0]))
    start = plant.season.days + 1 + (PRIVILEGED_BLOCKS - 1) * 30
    known = plant._weather[start:start + 30]
    assert 0 < len(known) < 30
    assert obs[last + 2] == pytest.approx(known[:, 2].mean() / 20, rel=1e-5)
    assert obs[last] == pytest.approx(known[:, 0].sum() / 100, rel=1e-5, abs=1e-6)
    while plant.season.days < 125:
        obs, *_ = env.step(np.array([-1.0]))
    assert obs[last] == obs[last + 1] == obs[last + 2] == 0.0


def test_train_and_test_seasons_come_from_disjoint_weather_years_with_complete_weather(crop):
    _, setup = crop
    assert not set(PRESETS["train"].years) & set(PRESETS["test"].years)
    weather = weather_provider(setup.weather)
    for errors in PRESETS.values():
        for year in errors.years:
            first = dt.date(year, setup.sowing_month, setup.sowing_day) + dt.timedelta(days=errors.sowing_shift_days[0])
            for day in range(setup.max_duration + errors.sowing_shift_days[1] - errors.sowing_shift_days[0] + 1):
                weather(first + dt.timedelta(days=day))  # raises on a gap
    a, b = draw_field(setup, PRESETS["test"], 9), draw_field(setup, PRESETS["test"], 9)
    assert a == b and a != draw_field(setup, PRESETS["train"], 9)
    initial_n = [draw_field(setup, PRESETS["train"], s).site.NAVAILI for s in range(40)]
    assert min(initial_n) < 25 and max(initial_n) > 65  # the field varies, not only the weather


def test_a_season_with_a_gap_in_its_weather_is_refused_naming_the_day(crop):
    definition, setup = crop
    errors = PRESETS["train"].model_copy(update={"name": "gap", "years": (1991,)})
    plant = definition.sim_plant(setup, errors)
    with pytest.raises(ConfigError, match=r"weather 'NL1', season sown 1991-.*No weather data for 1991-"):
        plant.reset(0)


def test_the_expert_splits_at_its_stages_and_more_n_pays_on_an_n_limited_season(crop):
    definition, setup = crop
    plant, task = field(crop)
    config = definition.task_config(setup)
    none, expert = run_schedule(plant, 0, None, config), run_schedule(plant, 0, setup.expert, config)
    days = [d for d, dose in enumerate(expert.doses) if dose > 0]
    assert [expert.doses[d] for d in days] == list(setup.expert.doses)
    dvs = [expert.trace[d]["dvs"] for d in days]  # the stage on the day each dose was decided
    assert all(s >= at for s, at in zip(dvs, setup.expert.at)) and dvs == sorted(dvs)
    assert expert.grain_kg_ha > none.grain_kg_ha + 2000 and expert.profit_usd_ha > none.profit_usd_ha


@pytest.mark.slow  # ~25 s: 50 whole seasons
def test_optimised_doses_follow_the_season_less_n_where_water_limits_the_yield(crop):
    """Train season 5 is water-limited (its yield saturates near 120 kg N/ha), season 0 is N-hungry."""
    definition, setup = crop
    config = definition.task_config(setup)
    errors = definition.load_errors("train")
    dry, dry_profit = optimise_doses(setup, errors, [5], config, evaluations=25)
    hungry, hungry_profit = optimise_doses(setup, errors, [0], config, evaluations=25)
    plant, _ = field(crop)
    assert sum(dry.doses) < sum(hungry.doses) - 30
    assert dry_profit >= run_schedule(plant, 5, setup.expert, config).profit_usd_ha
    assert hungry_profit > run_schedule(plant, 0, setup.expert, config).profit_usd_ha


def test_a_policy_for_another_crop_is_refused(crop):
    definition, setup = crop
    assert definition.default_setup() == "wheat" and set(definition.shipped_setups()) == {"wheat", "maize"}
    maize = definition.load_setup("maize")
    metadata = {"lattice": {"crop": "wheat", "variety": setup.variety, "max_dose_kg_ha": setup.max_dose_kg_ha}}
    assert definition.check_policy(metadata, setup) is None
    assert "crop=wheat" in definition.check_policy(metadata, maize)


def test_the_shipped_policy_sets_a_soil_n_target_and_its_task_fills_the_pool(crop):
    """The policy file says what its action means; the task built from it (as evaluation
    and deployment build it) turns the policy's output into the dose that fills the pool."""
    from controller.policy import Policy

    definition, setup = crop
    agent = Policy.load("pretrained", definition, setup)
    config = CropTaskConfig.model_validate(agent.metadata["task_config"])
    assert config.action == "soil_n_target" and "soil mineral N wanted" in agent.metadata["action"]["unit"]
    assert definition.training_overrides(config) == {"zero_init_actor": True, "ent_coef": 0.05}
    assert definition.training_overrides(CropTaskConfig()) == {}
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    task = definition.task_for_policy(plant.knobs, plant.readings, agent.metadata)
    plant.reset(0)
    obs = task.start(plant)
    action = agent.act(obs)
    level = (float(action[0]) + 1.0) / 2.0 * config.soil_n_target_max_kg_ha
    spring = {**task._values(task.last_readings), "dvs": 0.5, "soil_n": 10.0}
    want = min((level - 10.0) / config.n_recovery, config.max_dose_kg_ha)
    assert task.dose(action, spring) == pytest.approx(want if want >= config.min_dose_kg_ha else 0.0)


def test_tbsac_evaluate_crop_reports_every_method_and_refuses_an_unknown_crop(run_cli, tmp_path):
    import json

    proc = run_cli("evaluate", "crop", "--crop", "wheat", "--policy", "none", "--seasons", "2", "--seed", "0",
                   "--methods", "none,expert,best_fixed", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    results = out["results"]
    assert set(results) == {"none", "expert", "best_fixed"} and out["episodes"] == 2
    for r in results.values():
        assert set(r) == {"yield_kg_ha", "n_applied_kg_ha", "profit", "nue", "fraction_of_hindsight"}
        assert r["profit"]["p5"] <= r["profit"]["median"]
    assert results["none"]["n_applied_kg_ha"]["median"] == 0 and results["none"]["nue"]["median"] is None
    assert results["expert"]["n_applied_kg_ha"]["median"] == 160
    assert results["expert"]["yield_kg_ha"]["median"] > results["none"]["yield_kg_ha"]["median"]
    bad = run_cli("evaluate", "crop", "--crop", "rice", "--policy", "none", "--seasons", "1", timeout=120)
    assert bad.returncode == 2 and "rice" in bad.stderr and "wheat" in bad.stderr, bad.stderr


def test_the_evaluation_figure_shows_each_methods_season(crop, tmp_path):
    definition, setup = crop
    summary, runs = definition.evaluate(setup, definition.load_errors("test"), None, 1, 0, ("none", "expert"))
    assert set(runs) == {"none", "expert"} and summary["results"]["expert"]["fraction_of_hindsight"]["median"] is None
    path = definition.plot_evaluation(setup, runs, tmp_path / "crop.png", "wheat, test")
    assert path.stat().st_size > 20_000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # ~25 s: 80 whole seasons in two processes; the benchmark runs it on 40 seasons
def test_the_hindsight_ceiling_is_optimised_per_season_in_worker_processes(crop):
    """Two seasons, two worker processes: each season's own optimum, never below the best
    fixed schedule it starts from (the shares of the ceiling are per season, in order)."""
    definition, setup = crop
    summary, _ = definition.evaluate(setup, definition.load_errors("test"), None, 2, 3, ("best_fixed", "hindsight"))
    fixed, ceiling = summary["results"]["best_fixed"], summary["results"]["hindsight"]
    assert ceiling["fraction_of_hindsight"]["median"] == 1.0
    assert 0.9 < fixed["fraction_of_hindsight"]["median"] <= 1.0
    assert ceiling["profit"]["median"] >= fixed["profit"]["median"]
