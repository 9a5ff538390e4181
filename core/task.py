"""The task contract: what turns a plant's readings into observations and rewards.

Two levels:

- :class:`Task` is one episode on one plant (simulated, guarded, over EPICS): it
  starts, turns actions into settings, steps, and reports its metrics. It may take
  over the choice of action (e.g. walk back to the best setting measured).
- :class:`TaskDefinition` is what the registry (:mod:`core.registry`) knows by name:
  its metrics, setups (lattices), simulated plant, policy metadata, default safety
  settings, baselines, evaluation summary, console panels and virtual-machine wiring.
  Generic code (training, evaluation, sessions, replay, the IOC, the console) asks the
  definition; it never tests a task's name.

:func:`run_episode` is the one episode loop, used by training-time evaluation,
``tbsac evaluate``, sessions on a guarded plant and the virtual machines alike.
Imports nothing from the project.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import gymnasium as gym
import numpy as np

from .config import ConfigError
from .plant import Event, KnobSpec, Plant, PlantFault, ReadingSpec, SimulatedPlant


@dataclass(frozen=True)
class MetricSpec:
    """A number that says how well the plant is tuned."""

    name: str  # key in step records and summaries, e.g. rms_mm
    unit: str  # "1" for a dimensionless ratio
    higher_is_better: bool
    target: float | None = None  # reaching it (in the better direction) means success
    label: str = ""  # what an operator calls it

    def reached(self, value: float | None) -> bool:
        if value is None or self.target is None or not np.isfinite(value):
            return False
        return value >= self.target if self.higher_is_better else value < self.target

    @property
    def title(self) -> str:
        """Axis title with the unit."""
        return f"{self.label or self.name} ({self.unit})"


@dataclass
class Outcome:
    """How a session ends: its status and what happens to the machine."""

    success: bool
    status: str  # completed, not_converged
    restore_reason: str | None = None  # restore the start, with this reason
    note: str | None = None  # keep the settings, with this explanation


def walk_action(target: np.ndarray, settings: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The next move towards `target`: at most one step per knob, as an action in [-1, 1]."""
    return np.clip((np.asarray(target) - np.asarray(settings)) / np.asarray(step), -1.0, 1.0)


class Task(ABC):
    """One episode on a plant: observations, rewards, settings and metrics.

    Attributes set by ``start``: ``initial_readings`` (before any write) and
    ``last_readings`` (the latest reading vector); ``steps`` counts writes.
    """

    metrics: ClassVar[tuple[MetricSpec, ...]]  # the first is the primary metric
    max_steps: int
    steps: int = 0
    settings: np.ndarray
    initial_readings: np.ndarray
    last_readings: np.ndarray
    trained_step: np.ndarray  # knob change per action unit, as trained

    @abstractmethod
    def start(self, plant: Plant) -> np.ndarray:
        """Read the plant (and probe it if the task needs to); the first observation."""

    @abstractmethod
    def proposed_settings(self, action: np.ndarray) -> np.ndarray:
        """Settings the action asks for, before any safety layer."""

    @abstractmethod
    def step(self, plant: Plant, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Write the action's settings, read; (obs, reward, terminated, truncated, info)."""

    @abstractmethod
    def measure(self, readings: np.ndarray) -> dict[str, float]:
        """The metrics of one reading vector (the one definition of each metric)."""

    def metric_values(self) -> dict[str, float]:
        """The metrics now."""
        return self.measure(self.last_readings)

    # What only a simulator knows (e.g. the prices still to come), for the critics in
    # training (asymmetric actor-critic): the actor never sees it, so a policy runs on a
    # real plant without it. 0: the task has none.
    privileged_size: int = 0

    def privileged(self, plant: SimulatedPlant) -> np.ndarray:
        """The privileged features now (``privileged_size`` values), read from the simulator."""
        return np.zeros(0, dtype=np.float32)

    def reference_action(self) -> np.ndarray | None:
        """The action of the task's reference policy, held every step (training only: a
        twin plant runs it on the same episode, see :class:`TaskEnv`); None: the task has none."""
        return None

    def next_action(self, policy: Callable[[np.ndarray], np.ndarray], obs: np.ndarray) -> tuple[np.ndarray, Event | None, str]:
        """(action, event to record or None, who chose it). Default: the policy."""
        return policy(obs), None, "policy"

    @property
    def ended(self) -> bool:
        """The task ended the episode by itself (e.g. its walk back arrived)."""
        return False

    def untouched(self, readings: np.ndarray) -> bool:
        """True if a machine reading this must not be touched (already within target)."""
        return False

    def outcome(self, initial: float, final: float, info: dict | None) -> Outcome:
        """Status of a session that ran to its end (no trip): success or what to do."""
        spec = self.metrics[0]
        if spec.reached(final):
            return Outcome(True, "completed")
        return Outcome(False, "not_converged", restore_reason=f"{spec.label or spec.name} target {spec.target} not reached in {self.steps} steps")


@dataclass
class StepOutcome:
    """One step of an episode, as every caller of :func:`run_episode` sees it."""

    step: int
    observation: np.ndarray  # what the chooser saw
    action: np.ndarray
    proposed: np.ndarray
    reward: float
    info: dict
    by: str  # who chose the action (policy, or a task-level behaviour)
    latency_s: float
    metrics: dict[str, float] = field(default_factory=dict)  # the task's metrics after the step


@dataclass
class EpisodeResult:
    """A whole episode: metrics at the start and after every step."""

    seed: int | None
    initial: dict[str, float]  # metrics of the readings before any write
    start: dict[str, float]  # metrics after the task's start (e.g. a probe)
    trace: list[dict[str, float]] = field(default_factory=list)  # metrics after each step
    steps: int = 0
    terminated: bool = False
    truncated: bool = False
    info: dict = field(default_factory=dict)
    initial_readings: np.ndarray | None = None
    truth: list[float] = field(default_factory=list)  # noise-free primary metric per step, if a simulator tells
    final_readings: np.ndarray | None = None
    final_settings: np.ndarray | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.trace[-1] if self.trace else self.start


def run_episode(
    task: Task,
    plant: Plant,
    policy: Callable[[np.ndarray], np.ndarray],
    max_steps: int | None = None,
    seed: int | None = None,
    on_start: Callable[[np.ndarray], None] | None = None,
    on_step: Callable[[StepOutcome], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    before_step: Callable[[], None] | None = None,
) -> EpisodeResult:
    """Start `task` on `plant` and step it with `policy` until it ends.

    The task may take over the choice of action (``Task.next_action``); every step is
    reported to `on_step` as it happens, every task event to `on_event`.
    """
    obs = task.start(plant)
    if on_start:
        on_start(obs)
    result = EpisodeResult(seed, task.measure(task.initial_readings), task.metric_values(),
                           initial_readings=np.array(task.initial_readings, dtype=float))
    for _ in range(max_steps if max_steps is not None else task.max_steps):
        if before_step:
            before_step()
        t0 = time.perf_counter()
        seen = obs
        action, event, by = task.next_action(policy, seen)
        if event is not None and on_event:
            on_event(event)
        action = np.asarray(action, dtype=float)
        proposed = task.proposed_settings(action)
        obs, reward, terminated, truncated, info = task.step(plant, action)
        metrics = task.metric_values()
        result.trace.append(metrics)
        result.steps, result.info = task.steps, info
        result.terminated, result.truncated = bool(terminated), bool(truncated)
        if on_step:
            on_step(StepOutcome(task.steps, np.asarray(seen), action, proposed, float(reward), info, by,
                                time.perf_counter() - t0, metrics))
        if terminated or truncated or task.ended:
            break
    result.final_readings = np.array(task.last_readings, dtype=float)
    result.final_settings = np.array(task.settings, dtype=float)
    return result


MAX_START_ATTEMPTS = 50


def start_drawn_machine(task: Task, plant: SimulatedPlant, seed: int) -> np.ndarray:
    """Draw machine `seed` and start the task on it; if the task cannot start there (a
    PlantFault, e.g. the opening probe loses the beam of a badly mis-steered machine),
    draw the next machine from a generator seeded by `seed` (reproducible). The seed of
    the machine used is left in ``plant.drawn_seed``."""
    redraws = np.random.default_rng(seed)
    current = seed
    for attempt in range(MAX_START_ATTEMPTS):
        plant.reset(current)
        try:
            obs = task.start(plant)
            plant.drawn_seed = current
            return obs
        except PlantFault:
            if attempt == MAX_START_ATTEMPTS - 1:
                raise
            current = int(redraws.integers(2**62))
    raise AssertionError("unreachable")


class TaskEnv(gym.Env):
    """A Gymnasium environment: a task on a simulated plant (``reset(seed)`` draws a machine).

    With `privileged`, each observation is followed by the task's privileged features
    (:meth:`Task.privileged`): the training environment of an asymmetric actor-critic,
    whose actor reads the task's observation only.

    With `action_repeat` k > 1, one environment step holds the action for k task steps
    (or until the episode ends) and returns the sum of their rewards (frame skipping):
    for training on a plant where one step's action barely matters and only an action
    held for a while does (a crop's daily soil-N target). Policies still act every task
    step when they run; the agent's discount is per environment step.

    With `reference` (a twin plant and task), the twin runs the task's reference policy
    (:meth:`Task.reference_action`) on the same episode (the same seed) and each reward is
    the agent's minus the twin's (common random numbers): what the episode's draw pays
    whatever the agent does cancels, and what is left is what the agent's actions changed.
    The twin's return does not depend on the agent's actions, so the best policy is the
    same; training only."""

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, plant: SimulatedPlant, task: Task, privileged: bool = False, action_repeat: int = 1,
                 reference: tuple[SimulatedPlant, Task] | None = None):
        if int(action_repeat) < 1:
            raise ConfigError(f"action_repeat must be >= 1, got {action_repeat}")
        if reference is not None and reference[1].reference_action() is None:
            raise ConfigError(f"paired_reference: task {type(task).__name__} has no reference policy")
        self.plant, self.task = plant, task
        self.reference = reference
        self._reference_done = True
        self.action_repeat = int(action_repeat)
        self.privileged = bool(privileged and task.privileged_size)
        self.observation_space, self.action_space = task.observation_space, task.action_space
        if self.privileged:
            size = task.observation_space.shape[0] + task.privileged_size
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self._seeds = np.random.default_rng()

    def _with_privileged(self, obs: np.ndarray) -> np.ndarray:
        if not self.privileged:
            return obs
        return np.concatenate([obs, self.task.privileged(self.plant)]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._seeds = np.random.default_rng(seed)
        drawn = seed if seed is not None else int(self._seeds.integers(2**63))
        obs = start_drawn_machine(self.task, self.plant, drawn)
        if self.reference is not None:
            start_drawn_machine(self.reference[1], self.reference[0], drawn)
            self._reference_done = False
        return self._with_privileged(obs), dict(self.task.metric_values())

    def _reference_reward(self) -> float:
        if self._reference_done:
            return 0.0  # the twin's episode ended first: it earns nothing more
        plant, task = self.reference
        _, reward, terminated, truncated, _ = task.step(plant, task.reference_action())
        self._reference_done = terminated or truncated
        return reward

    def step(self, action):
        total = 0.0
        for _ in range(self.action_repeat):
            obs, reward, terminated, truncated, info = self.task.step(self.plant, action)
            total += reward
            if self.reference is not None:
                total -= self._reference_reward()
            if terminated or truncated:
                break
        return self._with_privileged(obs), total, terminated, truncated, info

    def close(self) -> None:
        self.plant.close()


def concat_parts(parts: list[dict[str, list]]) -> dict[str, list]:
    """Per-method records of evaluation parts joined in order (each part has the same methods)."""
    return {method: [record for part in parts for record in part[method]] for method in parts[0]}


class TaskDefinition(ABC):
    """A registered task: everything generic code needs to know about it.

    Subclasses set the class attributes and implement the methods; the registry
    (:func:`core.registry.get_task`) returns an instance.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    metrics: ClassVar[tuple[MetricSpec, ...]]
    default_arch: ClassVar[str] = "mlp"
    architectures: ClassVar[tuple[str, ...]] = ("mlp",)
    sac_overrides: ClassVar[dict] = {}
    train_defaults: ClassVar[dict] = {"steps": 20_000, "eval_every": 1000, "eval_episodes": 20}
    baselines: ClassVar[tuple[str, ...]] = ()
    default_baselines: ClassVar[tuple[str, ...]] = ()
    # Baselines that are other shipped policies, method -> variant (file <setup>-<variant>.pt);
    # ``evaluate`` then receives them as ``others={method: policy}``.
    policy_baselines: ClassVar[dict[str, str]] = {}
    safety_defaults: ClassVar[dict] = {}  # SafetyConfig fields
    sim_interlocks: ClassVar[list[dict]] = []  # interlock rules of the simulated machines
    summary_keys: ClassVar[tuple[str, ...]] = ()  # per-method keys of the evaluation summary
    scalars: ClassVar[dict[str, tuple[str, ...]]] = {}  # TensorBoard name -> path in the summary
    eval_seed_base: ClassVar[int] = 5_000_000  # training-time evaluation machines
    # Error preset of the training-time evaluation (checkpoint selection), unless given:
    # "test" draws other machines of the held-out preset; a task whose held-out dimension
    # must stay unseen until the benchmark (the crop's weather years) uses "train".
    training_eval_errors: ClassVar[str] = "test"
    # True where the acceptance bar compares the agent with baselines on the same days or
    # seasons (benchmarks/): ``bar_met`` cannot judge a policy's own evaluation.
    relative_bar: ClassVar[bool] = False
    # Error preset of machines whose physics differs from the setup file (``tbsac ioc
    # --foreign SEED``), for bring-up tests and benchmarks; None if the task has none.
    foreign_errors: ClassVar[str | None] = None

    def training_overrides(self, config: Any) -> dict:
        """Agent settings that the task config calls for, over ``sac_overrides`` (and under the
        user's): e.g. a residual task's actor starting at its base controller."""
        return {}

    def safety_limits(self, metadata: dict) -> dict:
        """SafetyConfig fields for a session of a policy with this `metadata` (default
        ``safety_defaults``; a task adds what depends on the trained setup, e.g. a budget)."""
        return dict(self.safety_defaults)

    # -- setups (lattices) and simulated plants -------------------------------------
    @abstractmethod
    def shipped_setups(self) -> list[str]:
        """Names of the shipped setups (lattices) of this task."""

    @abstractmethod
    def load_setup(self, name_or_path: str | Path) -> Any:
        """A setup by shipped name or file path (raises ConfigError); has ``.name``."""

    def default_setup(self) -> str:
        return self.shipped_setups()[0]

    @abstractmethod
    def error_presets(self) -> list[str]:
        """Names of the error presets (at least ``train`` and ``test``)."""

    @abstractmethod
    def load_errors(self, name_or_path: str) -> Any:
        """An error model by preset name or file (raises ConfigError); has ``.name``."""

    @abstractmethod
    def sim_plant(self, setup: Any, errors: Any) -> SimulatedPlant:
        """A simulated plant of `setup` whose ``reset(seed)`` draws machines from `errors`."""

    # -- the task ----------------------------------------------------------------------
    @abstractmethod
    def config_model(self) -> type:
        """The pydantic model of the task configuration."""

    @abstractmethod
    def make_task(self, setup: Any, knobs: list[KnobSpec], readings: list[ReadingSpec], config: Any) -> Task:
        """The task on a plant with these knobs and readings (simulated units)."""

    def task_for_policy(self, knobs: list[KnobSpec], readings: list[ReadingSpec], metadata: dict) -> Task:
        """The task a policy was trained on, on a plant with these knobs and readings."""
        config = self.config_model().model_validate(metadata.get("task_config", {}))
        return self.make_task(metadata.get("setup"), knobs, readings, config)

    @abstractmethod
    def policy_metadata(self, setup: Any, errors: Any, config: Any, task: Task) -> dict:
        """What a policy file records about its task (layout, observation, action scaling)."""

    @abstractmethod
    def check_policy(self, metadata: dict, setup: Any) -> str | None:
        """Why a policy with this metadata cannot drive `setup`, or None if it can."""

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_context(self, setup: Any, errors: Any, seeds: list[int]) -> dict:
        """Per-machine facts an evaluation needs beyond the episodes (e.g. best achievable)."""
        return {}

    @abstractmethod
    def summarise(self, episodes: list[EpisodeResult], context: dict) -> dict:
        """One method's evaluation summary (keys: ``summary_keys``)."""

    @abstractmethod
    def score(self, summary: dict) -> tuple:
        """Order of checkpoints: higher is better."""

    @abstractmethod
    def bar_met(self, summary: dict) -> bool:
        """The acceptance bar of a checkpoint."""

    def run_evaluation_episode(self, env: TaskEnv, policy, seed: int, max_steps: int | None = None) -> EpisodeResult:
        """One agent (or step-wise baseline) episode on machine `seed`."""
        start_drawn_machine(env.task, env.plant, seed)  # the machine the seed draws (one the task can start on)
        env.plant.reset(env.plant.drawn_seed)
        getattr(policy, "begin", lambda: None)()
        return run_episode(env.task, env.plant, policy.act, max_steps=max_steps, seed=seed)

    def evaluate(self, setup: Any, errors: Any, agent, episodes: int, seed: int, methods: tuple[str, ...],
                 budget: int | None = None, **extra) -> tuple[dict, dict[str, list]]:
        """Agent (if given) and `methods` on machines seed .. seed + episodes - 1: (summary, runs).
        `extra` carries ``others`` (the ``policy_baselines``' policies by method).

        The default is one part over every machine, merged: a task that splits its
        evaluation (``evaluate_part`` + ``merge_evaluation``) gets it; others override this."""
        if not self.splits_evaluation:
            raise NotImplementedError(f"task {self.name} implements neither evaluate nor evaluate_part")
        part = self.evaluate_part(setup, errors, agent, range(seed, seed + episodes), methods, budget, **extra)
        return self.merge_evaluation(setup, errors, agent, [part], seed, methods, budget)

    # An evaluation split over workers (``tbsac evaluate --workers N``): parts over disjoint
    # machine ranges, each machine's episodes depending only on its seed, so the merged
    # summary is the serial one, number for number.
    def evaluate_part(self, setup: Any, errors: Any, agent, seeds: range, methods: tuple[str, ...],
                      budget: int | None = None, **extra) -> dict[str, list]:
        """Per-method episode records (picklable) on machines `seeds`."""
        raise NotImplementedError(f"task {self.name} does not split its evaluation")

    def merge_evaluation(self, setup: Any, errors: Any, agent, parts: list[dict[str, list]], seed: int,
                         methods: tuple[str, ...], budget: int | None = None) -> tuple[dict, dict[str, list]]:
        """(summary, runs) of the parts of an evaluation, in machine order."""
        raise NotImplementedError(f"task {self.name} does not split its evaluation")

    @property
    def splits_evaluation(self) -> bool:
        """Whether ``evaluate_part``/``merge_evaluation`` are implemented (``--workers`` needs them)."""
        return type(self).evaluate_part is not TaskDefinition.evaluate_part

    @abstractmethod
    def results_table(self, summary: dict) -> tuple[list[str], list[list[str]]]:
        """(columns, rows) of an evaluation summary for a terminal table."""

    def plot_evaluation(self, setup: Any, runs: dict, path: Path, title: str) -> Path | None:
        """A figure of an evaluation, if the task has one."""
        return None

    # -- machines: layout for consoles, virtual machine wiring ---------------------------------
    safe_state_label: ClassVar[str] = "starting settings"  # what :meth:`safe_settings` puts the knobs to

    def safe_settings(self, knobs: list[KnobSpec], start: np.ndarray) -> np.ndarray:
        """Where the safety layer puts the knobs when a session trips, is aborted or
        rejected, or ends without reaching its target: by default the settings found at
        the start (a beamline's safe state). A task whose safe state is something else
        (a battery stops injecting, a bubble's drive goes to zero) overrides it."""
        return start

    def expected_response(self, metadata: dict) -> dict | None:
        """The linear response the policy's model predicts near the start:
        ``{"matrix": (n_readings x n_knobs), "noise": std of one reading}``; None if the
        task has no such model (sessions then cannot check the machine matches)."""
        return None

    def setup_response(self, setup: Any) -> np.ndarray | None:
        """The linear response (n_readings x n_knobs) the model of `setup` predicts, in the
        same units as :meth:`expected_response`: a policy trained on another setup is run
        on a machine of this one through a knob map (``controller.knob_map``). None if the
        task has no such model."""
        return None

    def calibrate(self, setup: Any, measurement: dict, out: Path) -> dict | None:
        """Fit the setup to a measured response (``controller.response``), write the
        calibrated setup file and a report into `out`; None if the task cannot.

        Returns ``{"setup_file", "knob_factors", "good", "verdict", "report", "markdown"}``:
        ``knob_factors[j]`` is the measured effect of one machine-file unit of knob j in
        units of the calibrated setup (the machine file's scale is divided by it).
        """
        return None

    def panels(self, setup: Any) -> list[dict]:
        """Console panels (generic kinds: ``profile``, ``bars``, ``series``, ``settings``;
        ``ui/console/charts.py``) with their parameters."""
        return [{"kind": "bars", "title": "Readings", "readings": None}]

    def wiring(self, setup: Any, knobs: list[KnobSpec]) -> tuple[list[float], str]:
        """Virtual machine: engineering units per knob unit (sign = polarity), and that unit."""
        return [1.0] * len(knobs), "A"

    def machine_readings(self, readings: list[ReadingSpec]) -> list[ReadingSpec]:
        """The readings of a machine file in the task's order (default: as given)."""
        return readings
