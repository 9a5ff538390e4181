"""RFQ transmission tuning as a registered task (``tbsac train rfq``, machine files ``task: rfq``)."""

from __future__ import annotations

from core.plant import KnobSpec, ReadingSpec
from core.task import EpisodeResult, TaskDefinition, concat_parts, run_episode

from .model import load_injector, shipped_injectors
from .task import INJECTOR_PRESETS, InjectorSimPlant, TransmissionTask, TransmissionTaskConfig, load_injector_errors

# The virtual injector's supplies: amperes per knob unit (T for solenoids, mrad for
# steerers); the vertical steerer of the second pair is wired reversed, as 'measured'.
SOLENOID_AMPS_PER_T = 400.0
STEERER_AMPS_PER_MRAD = 0.5


def injector_knob_scale(name: str) -> float:
    """Amperes per knob unit of the virtual injector's supply `name` (sign = polarity)."""
    if ":" not in name:
        return SOLENOID_AMPS_PER_T
    return -STEERER_AMPS_PER_MRAD if name == "ST2:V" else STEERER_AMPS_PER_MRAD


class RfqBar:
    """The RFQ acceptance bar: median final / best achievable and median steps to 85 %."""

    fraction_of_best = 0.95
    steps_to_85 = 15.0

    def met(self, summary: dict) -> bool:
        steps = summary["steps_to_85"]["median"]
        return summary["fraction_of_best"]["median"] >= self.fraction_of_best and steps is not None and steps <= self.steps_to_85


class RfqDefinition(TaskDefinition):
    """RFQ transmission: LEBT solenoids (T) and steerers (mrad) as knobs, ACCT and cup (mA) as readings."""

    name = "rfq"
    description = "RFQ transmission tuning of an injector (LEBT solenoids and steerers, ACCT and Faraday cup)"
    metrics = (TransmissionTask.metric(0.85),)
    default_arch = "mlp"
    architectures = ("mlp",)
    # Short horizon: improvements are paid at once; 0.8 beat 0.95 in validation.
    sac_overrides = {"gamma": 0.8}
    train_defaults = {"steps": 150_000, "eval_every": 5000, "eval_episodes": 20}
    baselines = ("nelder_mead", "xopt_bo", "random")
    default_baselines = baselines
    # Knobs in T and mrad: the excursion limit is counted in each knob's own steps.
    safety_defaults = {"max_excursion_steps": 15.0}
    sim_interlocks = [{"name": "transmission", "rule": "min_fraction_of_start", "threshold": 0.5}]
    summary_keys = ("final_transmission", "fraction_of_best", "steps_to_85", "steps_to_90pct_best", "initial_transmission",
                    "collapses")
    scalars = {"eval/fraction_of_best_median": ("fraction_of_best", "median"),
               "eval/final_transmission_median": ("final_transmission", "median"),
               "eval/steps_to_85_median": ("steps_to_85", "median")}
    eval_seed_base = 7_000_000

    def shipped_setups(self) -> list[str]:
        return shipped_injectors()

    def load_setup(self, name_or_path):
        return load_injector(name_or_path)

    def error_presets(self) -> list[str]:
        return list(INJECTOR_PRESETS)

    def load_errors(self, name_or_path):
        return load_injector_errors(name_or_path)

    def sim_plant(self, setup, errors) -> InjectorSimPlant:
        return InjectorSimPlant(setup, errors)

    def config_model(self) -> type:
        return TransmissionTaskConfig

    def make_task(self, setup, knobs: list[KnobSpec], readings: list[ReadingSpec], config) -> TransmissionTask:
        return TransmissionTask(knobs, setup.beam.current_ma, config)

    def task_for_policy(self, knobs, readings, metadata: dict) -> TransmissionTask:
        steps = metadata["action"]["step"]
        if len(steps) != len(knobs):
            raise ValueError(f"policy drives {len(steps)} knobs, the machine has {len(knobs)}")
        # Action scaling as in training; the machine file's limits still apply.
        trained = [KnobSpec(k.name, k.unit, k.lower, k.upper, step, k.tolerance) for k, step in zip(knobs, steps)]
        config = TransmissionTaskConfig.model_validate(metadata.get("task_config", {}))
        return TransmissionTask(trained, metadata["observation"]["nominal_current_ma"], config)

    def policy_metadata(self, setup, errors, config, task: TransmissionTask) -> dict:
        return {
            "lattice": {"name": setup.name, "knob_names": setup.knob_names},
            "observation": {"size": task.observation_space.shape[0], "layout": "see simulators.injector.task.TransmissionTask",
                            "readings": ["ACCT", "FC"], "nominal_current_ma": setup.beam.current_ma},
            "action": {"size": len(task.knobs), "step": [k.max_step for k in task.knobs], "unit": [k.unit for k in task.knobs]},
        }

    def check_policy(self, metadata: dict, setup) -> str | None:
        trained = metadata.get("lattice", {}).get("knob_names")
        if trained != setup.knob_names:
            return f"field 'metadata.lattice.knob_names': policy expects {trained}, lattice {setup.name} has {setup.knob_names}"
        return None

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_context(self, setup, errors, seeds: list[int]) -> dict:
        """Per injector: the true starting transmission and the best achievable (offline Nelder-Mead)."""
        from .baselines import best_achievable

        plant = InjectorSimPlant(setup, errors)
        out = {}
        for seed in seeds:
            plant.reset(seed)
            out[seed] = {"initial": plant.true_transmission(),
                         "best": best_achievable(plant.model, setup, [plant.read_knobs()])}
        return out

    def run_evaluation_episode(self, env, policy, seed: int, max_steps: int | None = None) -> EpisodeResult:
        env.plant.reset(seed)
        truth: list[float] = []
        result = run_episode(env.task, env.plant, policy.act, max_steps=max_steps, seed=seed,
                             on_step=lambda _: truth.append(env.plant.true_transmission()))
        result.truth = truth
        return result

    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        from .baselines import RfqEpisode, summarise_rfq

        return summarise_rfq([
            RfqEpisode(e.seed, context[e.seed]["initial"], e.truth, e.truth[-1], max(context[e.seed]["best"], *e.truth))
            for e in episodes])

    def score(self, summary: dict) -> tuple:
        steps = summary["steps_to_85"]["median"]
        return (summary["fraction_of_best"]["median"], -(steps if steps is not None else 1e9))

    def bar_met(self, summary: dict) -> bool:
        return RfqBar().met(summary)

    def evaluate_part(self, setup, errors, agent, seeds, methods, budget=None, **extra):
        from .baselines import rfq_runs

        chosen = (("agent",) if agent is not None else ()) + tuple(m for m in methods if m != "agent")
        return rfq_runs(setup, errors, agent, seeds, budget or 30, chosen)

    def merge_evaluation(self, setup, errors, agent, parts, seed, methods, budget=None):
        from .baselines import rfq_summary

        runs = concat_parts(parts)
        return rfq_summary(setup.name, errors.name, seed, budget or 30, runs), runs

    def results_table(self, summary: dict):
        columns = ["method", "final T median", "final / best median", "steps to 85 % (reached)", "steps to 0.9 best (reached)"]
        rows = [[name, str(r["final_transmission"]["median"]), str(r["fraction_of_best"]["median"]),
                 f"{r['steps_to_85']['median']} ({r['steps_to_85']['reached']})",
                 f"{r['steps_to_90pct_best']['median']} ({r['steps_to_90pct_best']['reached']})"]
                for name, r in summary["results"].items()]
        return columns, rows

    # -- machines ------------------------------------------------------------------------------
    def panels(self, setup) -> list[dict]:
        return [{"kind": "bars", "title": "Beam currents", "readings": ["ACCT", "FC"], "value_title": "beam current (mA)",
                 "caption": "transmission = FC / ACCT"}]

    def wiring(self, setup, knobs: list[KnobSpec]) -> tuple[list[float], str]:
        return [injector_knob_scale(k.name) for k in knobs], "A"
