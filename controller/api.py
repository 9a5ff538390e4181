"""The use cases, for the command line and the control server (ui/ talks only to this room).

train, evaluate, serve a virtual machine, open a machine, run a session, restore,
replay, export: each dispatches through the task registry, so none names a task.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.config import ConfigError, parse_model
from core.plant import PlantFault
from core.registry import get_task, task_names
from core.task import TaskDefinition
# Virtual machines (the demo, benchmarks): start one in the background on a loopback port.
from hardware.ioc import free_port, loopback_environment, start_virtual_ioc
from safety.guard import MODES, GuardedPlant, SafetyConfig, SafetyEvent, read_snapshot, restore_snapshot

from .agents import ALGORITHMS
from .locks import MachineBusy
from .machines import Machine, list_machines, open_machine
from .paths import data_dir, unique_snapshot_path
from .policy import POLICY_DIR, Policy, refuse_unfit_for_mode
from .recording import SessionRecorder, register_policy
from .response import recorded_response
from .replay import export, replay
from .session import SessionResult, default_safety, run_session, session_knob_map
from .store import Store, default_url

__all__ = ["ConfigError", "Evaluation", "PlantFault", "describe", "evaluate", "export", "free_port", "list_machines",
           "loopback_environment", "machine_task", "open_machine", "open_store", "replay", "restore", "run_on_machine",
           "serve_virtual_machine", "start_virtual_ioc", "task_names", "train"]


@contextmanager
def _holding(opened: Machine, purpose: str, refusal: str = ""):
    """The machine's cross-process lock for the block (none for a simulated machine);
    ConfigError (exit 2 / HTTP 409) naming the holder if another process has it."""
    lock = opened.lock()
    try:
        if lock:
            lock.acquire(purpose=purpose)
    except MachineBusy as exc:
        raise ConfigError(f"{refusal}{exc}") from None
    try:
        yield lock
    finally:
        if lock:
            lock.release()


def open_store() -> Store:
    """The session store (TBSAC_DATABASE_URL or SQLite in the data directory)."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    try:
        store = Store()
    except (ArgumentError, OperationalError) as exc:
        raise ConfigError(f"session store: cannot open database ({str(exc).splitlines()[0]})") from None
    store.mark_interrupted()  # sessions of processes that died (e.g. a `tbsac run` killed with SIGKILL)
    return store


def describe() -> dict:
    """What is installed: data directory, store, tasks with their setups, error presets, machines, policies."""
    from hardware.machine import MACHINE_DIR

    return {
        "data_dir": str(data_dir()), "store": default_url(),
        "tasks": {n: {"description": get_task(n).description, "lattices": get_task(n).shipped_setups(),
                      "error_presets": get_task(n).error_presets(), "baselines": list(get_task(n).baselines)}
                  for n in task_names()},
        "machines": sorted(p.name[:-5] for p in MACHINE_DIR.iterdir() if p.name.endswith(".yaml")),
        "policies": sorted(p.name for p in POLICY_DIR.iterdir() if p.name.endswith(".pt")),
    }


def _setup(task: str, lattice: str | None) -> tuple[TaskDefinition, object]:
    definition = get_task(task)
    return definition, definition.load_setup(lattice or definition.default_setup())


def parse_settings(settings: list[str], option: str) -> dict:
    """``KEY=VALUE`` strings (values as YAML scalars) -> a mapping; ConfigError naming a bad one."""
    import yaml

    out = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"{option} {item!r}: the value is not a YAML scalar") from None
    return out


def train(task: str, lattice: str | None, errors: str, eval_errors: str | None, steps: int | None, seed: int, out: Path,
          arch: str | None = None, eval_every: int | None = None, eval_episodes: int | None = None,
          stop_at_bar: bool = False, sac_overrides: dict | None = None, progress: bool = True, init_from: str | None = None,
          max_minutes: float | None = None, on_evaluation=None, sweep: str | None = None, trial: str | None = None,
          task_config: dict | None = None):
    """Train an agent on `task`, recorded in the store as a training run; registers its policy
    (the file's bytes too). Returns the TrainResult with the run's and the policy's ids.

    `task_config` sets task parameters (the task's config model, validated; e.g. the
    battery's ``base: mpc``); the policy records them.

    `init_from` (a policy file or ``pretrained``) fine-tunes a trained policy instead of starting afresh;
    `sweep`/`trial` name the sweep trial this run is (``tbsac sweep``)."""
    from .training import evaluation_interval, train as train_task

    definition, setup = _setup(task, lattice)
    arch = arch or definition.default_arch
    if arch not in definition.architectures:
        raise ConfigError(f"--arch: {arch!r} is not available for task {task}; expected one of {', '.join(definition.architectures)}")
    em, eval_em = definition.load_errors(errors), definition.load_errors(eval_errors or definition.training_eval_errors)
    algorithm = (sac_overrides or {}).get("algorithm", definition.sac_overrides.get("algorithm", "sac"))
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--algo: unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    if (sac_overrides or {}).get("risk_weight") and algorithm != "tqc":
        raise ConfigError("--risk-weight: needs the distributional agent (--algo tqc)")
    if {**definition.sac_overrides, **(sac_overrides or {})}.get("privileged_critic") and algorithm == "ddpg":
        raise ConfigError("--algo ddpg: privileged critics (an asymmetric actor-critic, the task's default) need sac or "
                          "tqc; add --plain-critic")
    init_policy = None
    if init_from:
        from .policy import resolve_init_policy

        init_policy = Policy.load(resolve_init_policy(init_from, setup), definition, setup)
    steps = steps or definition.train_defaults["steps"]
    eval_episodes = eval_episodes or definition.train_defaults["eval_episodes"]
    config = parse_model(definition.config_model(), task_config or {}, f"{task} task settings")
    store = open_store()
    overrides = {**definition.sac_overrides, **definition.training_overrides(config), **(sac_overrides or {})}
    eval_every = eval_every or evaluation_interval(definition, overrides)
    run_row = store.start_training_run(
        task=task, lattice=setup.name, errors=em.name, arch=arch, steps=steps, seed=seed, out_dir=str(out.resolve()),
        sweep=sweep, trial=trial,
        config={"eval_errors": eval_em.name, "eval_every": eval_every, "eval_episodes": eval_episodes, **overrides,
                **({"task_config": task_config} if task_config else {}),
                **({"init_from": str(init_policy.path)} if init_policy else {})})
    try:
        result = train_task(definition, setup, em, steps, seed, out, arch, eval_em, eval_every, eval_episodes, config=config,
                            progress=progress, stop_at_bar=stop_at_bar, sac_overrides=sac_overrides, init_policy=init_policy,
                            max_seconds=max_minutes * 60 if max_minutes else None, on_evaluation=on_evaluation)
    except BaseException:
        store.finish_training_run(run_row.id, "failed", {}, [])
        raise
    store.finish_training_run(run_row.id, "completed", {
        "best_step": result.best_step, "best": result.best_summary, "first_bar_step": result.first_bar_step,
        "first_bar_seconds": result.first_bar_seconds, "wall_seconds": result.wall_seconds}, result.curves)
    trained = Policy.load(result.policy_path)
    content = result.policy_path.read_bytes()
    row = store.add_policy(result.policy_path, hashlib.sha256(content).hexdigest(), trained.metadata, training_run_id=run_row.id,
                           content=content)
    result.run_id, result.policy_id = run_row.id, row.id
    return result


@dataclass
class Evaluation:
    definition: TaskDefinition
    setup: object
    errors: object
    summary: dict
    runs: dict
    evaluation_id: int | None = None  # the store's row


def evaluate(task: str, lattice: str | None, policy: str | None, episodes: int, seed: int, errors: str,
             methods: tuple[str, ...] | None = None, budget: int | None = None, workers: int = 1,
             address: str | None = None) -> Evaluation:
    """The agent (unless `policy` is None) and the task's baselines on the same machines; recorded.

    With `workers` > 1 or a Ray cluster `address` the machines are split over Ray workers;
    the numbers are the serial run's (each machine's episodes depend only on its seed)."""
    import torch

    torch.set_num_threads(1)  # as on the workers: a split evaluation must equal the serial one
    definition, setup = _setup(task, lattice)
    chosen = definition.default_baselines if methods is None else methods
    unknown = [m for m in chosen if m not in definition.baselines]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; task {task} has {', '.join(definition.baselines) or 'no baselines'}")
    em = definition.load_errors(errors)
    agent = Policy.load(policy, definition, setup) if policy else None
    # Methods that are other shipped policies (e.g. the bubble's DDPG comparison)
    others = {m: Policy.load("pretrained", definition, setup, variant) for m, variant in definition.policy_baselines.items()
              if m in chosen}
    extra = {"others": others} if others else {}
    if workers > 1 or address:
        from .cluster import evaluate_on_workers

        summary, runs = evaluate_on_workers(definition, setup, em, agent, episodes, seed, tuple(chosen), budget, workers, address,
                                            **extra)
    else:
        summary, runs = definition.evaluate(setup, em, agent, episodes, seed, tuple(chosen), budget, **extra)
    store = open_store()
    row = store.add_evaluation(register_policy(store, agent) if agent else None, summary)
    return Evaluation(definition, setup, em, summary, runs, row.id)


def absolute_store_url(url: str) -> str:
    """`url` with a relative SQLite path made absolute (sweep trials run in other directories)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        parsed = parsed.set(database=str(Path(parsed.database).resolve()))
    return parsed.render_as_string(hide_password=False)


def sweep(path: Path, address: str | None = None, out: Path | None = None, max_concurrent: int | None = None,
          on_progress: Callable[[str], None] = print):
    """Run a sweep file's trials on Ray (local, or the cluster at `address`); each trial is
    recorded in the store as a training run (curve, policy) and an evaluation."""
    from .cluster import import_ray
    from .sweep import load_sweep, run_sweep

    import_ray()  # before anything else: say how to install it
    spec = load_sweep(path)
    store = open_store()  # the schema is upgraded here, once, before trials open the store
    url = absolute_store_url(store.url)
    if address and url.startswith("sqlite"):
        on_progress(f"warning: the store is a SQLite file on this host ({store.display_url}); trials on other hosts of the "
                    "cluster cannot write it: set TBSAC_DATABASE_URL to a PostgreSQL database they can reach")
    return run_sweep(spec, out or Path("runs") / "sweeps" / spec.name, url, address, max_concurrent, on_progress)


def promote(sweep_name: str, lattice: str | None = None, dry_run: bool = False, force: bool = False) -> list[dict]:
    """Install the best completed trial of a sweep, per lattice, as that lattice's shipped
    (``pretrained``) policy; the replaced file is kept in the data directory.

    Best = the task's own score of the trial's best periodic evaluation (what training
    uses to keep a checkpoint); one that did not meet the task's bar there is refused
    unless `force`. The policy comes from the store's copy of its file."""
    from .store import PolicyRow, TrainingRunRow

    store = open_store()
    runs = store.list(TrainingRunRow, TrainingRunRow.sweep == sweep_name, TrainingRunRow.status == "completed")
    if not runs:
        raise ConfigError(f"--sweep: no completed training runs recorded for sweep {sweep_name!r}")
    if lattice:
        runs = [r for r in runs if r.lattice == lattice]
        if not runs:
            raise ConfigError(f"--lattice: sweep {sweep_name!r} has no completed run on lattice {lattice!r}")
    promoted = []
    for name in dict.fromkeys(r.lattice for r in runs):
        candidates = [r for r in runs if r.lattice == name and (r.evaluation or {}).get("best")]
        if not candidates:
            continue
        definition = get_task(candidates[0].task)
        best = max(candidates, key=lambda r: definition.score(r.evaluation["best"]))
        if not definition.relative_bar and not definition.bar_met(best.evaluation["best"]) and not force:
            raise ConfigError(f"sweep {sweep_name!r}, lattice {name}: the best trial (run {best.id}, {best.trial}) did not meet "
                              f"the {definition.name} bar on its evaluation; not promoted (--force to promote it anyway)")
        policies = store.list(PolicyRow, PolicyRow.training_run_id == best.id)
        if not policies:
            raise ConfigError(f"sweep {sweep_name!r}: run {best.id} recorded no policy")
        content = store.policy_content(policies[0].id)
        if content is None:
            source = Path(policies[0].path)
            if not source.is_file():
                raise ConfigError(f"run {best.id}: the store keeps no copy of its policy and {source} is not on this host")
            content = source.read_bytes()
        target = POLICY_DIR / f"{name}.pt"
        entry = {"lattice": name, "training_run": best.id, "trial": best.trial, "policy": policies[0].id,
                 "sha256": policies[0].sha256, "best": best.evaluation["best"], "target": str(target), "backup": None}
        if not dry_run:
            import tempfile

            if hashlib.sha256(content).hexdigest() != policies[0].sha256:
                raise ConfigError(f"run {best.id}: the stored policy does not match its recorded sha256; not promoted")
            with tempfile.TemporaryDirectory() as tmp:  # the file must load as a policy of the task before it replaces one
                check = Path(tmp) / target.name
                check.write_bytes(content)
                Policy.load(check, definition)
            if target.exists():
                backups = data_dir() / "promoted"
                backups.mkdir(exist_ok=True)
                backup = backups / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-replaced.pt"
                backup.write_bytes(target.read_bytes())
                entry["backup"] = str(backup)
            target.write_bytes(content)
        promoted.append(entry)
    return promoted


def policy_catalogue(store: Store) -> list[dict]:
    """Every recorded policy with what an operator chooses it by: a name (sweep/trial, the
    training run, or the file), its training's best periodic evaluation (the task's key
    numbers) and whether that met the task's bar (None where the bar is relative to
    baselines or nothing was recorded), and its latest ``tbsac evaluate``."""
    from .store import EvaluationRow, PolicyRow, TrainingRunRow, row_dict

    runs = {r.id: r for r in store.list(TrainingRunRow)}
    latest: dict[int, EvaluationRow] = {}
    for row in store.list(EvaluationRow, EvaluationRow.policy_id.is_not(None)):
        latest[row.policy_id] = row  # ordered by id: the last one wins
    out = []
    for row in store.list(PolicyRow):
        entry = row_dict(row)
        run = runs.get(row.training_run_id)
        task = row.meta.get("task")
        definition = get_task(task) if task in task_names() else None
        name = Path(row.path).stem
        if run is not None:
            name = f"{run.sweep}/{run.trial}" if run.sweep else f"run {run.id} ({name})"
        best = (run.evaluation or {}).get("best") if run is not None else None
        entry.update(name=name, task=task, bar_met=None, training_summary={})
        if best and definition is not None:
            entry["training_summary"] = {key.split("/")[-1]: _summary_value(best, keys)
                                         for key, keys in definition.scalars.items()}
            entry["bar_met"] = None if definition.relative_bar else bool(definition.bar_met(best))
        evaluation = latest.get(row.id)
        entry["evaluation"] = None if evaluation is None else {
            "id": evaluation.id, "errors": evaluation.errors, "episodes": evaluation.episodes,
            "agent": evaluation.results.get("agent"), "created": row_dict(evaluation)["created"]}
        out.append(entry)
    return out


def _summary_value(summary: dict, keys: tuple[str, ...]):
    """Training's lookup of a scalar in a summary; None where a recorded summary lacks it."""
    from .training import _path

    try:
        return _path(summary, keys)
    except (KeyError, TypeError):
        return None


def serve_virtual_machine(lattice: str, seed: int, errors: str, port: int, ramp: float, put_log: Path | None,
                          prefix: str | None, task: str | None = None, period_s: float | None = None) -> None:
    """Serve a simulated machine of any task as a real EPICS IOC until stopped."""
    from hardware.ioc import resolve, serve

    resolve(lattice, errors, task, period_s)  # fail with a clear message before starting EPICS
    serve(lattice, seed, errors, port, ramp, put_log, prefix, task, period_s)


def run_on_machine(machine: str, policy: str, mode: str, operator: str, max_steps: int | None = None,
                   max_excursion: float | None = None, max_excursion_steps: float | None = None,
                   snapshot: Path | None = None, approver_for: Callable[[Machine], Callable] | None = None,
                   on_event: Callable[[SafetyEvent], None] | None = None,
                   guard_ready: Callable[[GuardedPlant], None] | None = None) -> tuple[SessionResult, int, Machine]:
    """Open `machine`, load `policy` for it, run a recorded session through the safety layer."""
    if mode not in MODES:
        raise ConfigError(f"--mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    opened = open_machine(machine, connect=False)
    agent = Policy.load(policy, opened.definition, opened.setup)
    refuse_unfit_for_mode(agent, mode)
    knob_map = session_knob_map(agent, opened.setup)  # refuses before anything is recorded
    limits = default_safety(agent, opened.plant).model_dump()
    for key, value in (("max_steps", max_steps), ("max_excursion", max_excursion), ("max_excursion_steps", max_excursion_steps)):
        if value is not None:
            limits[key] = value
    safety = parse_model(SafetyConfig, limits, "safety limits")
    with _holding(opened, "session") as lock:
        opened.connect()
        store = open_store()
        recorder = SessionRecorder(store, opened.record, agent, operator, mode, None, opened.plant,
                                   opened.panels(), [r.name for r in opened.interlocks], opened.engineering())
        if lock:
            lock.note_session(recorder.session_id)
        snap = snapshot or unique_snapshot_path(opened.name, recorder.session_id)
        store.set_snapshot(recorder.session_id, str(snap))
        return (_run_recorded(opened, agent, mode, safety, snap, recorder, approver_for, on_event, guard_ready, knob_map),
                recorder.session_id, opened)


def _run_recorded(opened: Machine, agent: Policy, mode: str, safety: SafetyConfig, snap: Path, recorder: SessionRecorder,
                  approver_for, on_event, guard_ready, knob_map) -> SessionResult:

    def record_event(event: SafetyEvent) -> None:
        recorder.on_event(event)
        if on_event:
            on_event(event)

    result = run_session(
        opened.plant, agent, mode=mode, safety=safety, interlocks=opened.interlocks, snapshot_path=snap,
        snapshot_context={"machine_file": str(Path(opened.path).resolve()) if opened.path else None, "machine": opened.name,
                          "session": recorder.session_id},
        approver=approver_for(opened) if approver_for and mode == "approve" else None,
        guard_ready=guard_ready, on_step=recorder.on_step, on_event=record_event,
        measured_response=recorded_response(recorder.store, opened) if mode == "dry-run" else None, knob_map=knob_map,
    )
    recorder.finish(result)
    return result


def restore(snapshot: Path, machine: str | None = None) -> int:
    """Write a snapshot back to its machine and verify it; the number of knobs restored.

    Raises PlantFault (or ValueError) if the restore cannot be verified.
    """
    try:
        blob = read_snapshot(snapshot)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{snapshot}: not a readable snapshot ({exc})") from None
    machine_arg = machine or blob.get("machine_file")
    if not machine_arg:
        raise ConfigError(f"{snapshot}: field 'machine_file' missing; pass --machine")
    opened = open_machine(machine_arg, connect=False)
    with _holding(opened, "restore", "refusing to restore while a session is live: "):
        writes = restore_snapshot(opened.connect().plant, blob)
    if isinstance(blob.get("session"), int):  # the session's own log says it was restored
        import datetime as dt

        open_store().add_event(blob["session"], dt.datetime.now(dt.timezone.utc), "restore",
                               f"starting settings restored from {snapshot} in {writes} writes and verified (tbsac restore)")
    return len(blob.get("channels") or blob["knobs"])


def machine_task(machine: str) -> tuple[str, str]:
    """(task, lattice) of a machine file, by shipped name or path."""
    from hardware.machine import load_machine

    machine_file, _ = load_machine(machine)
    return machine_file.task, machine_file.lattice


def measure_response(machine: str, operator: str, settings=None, on_event: Callable[[SafetyEvent], None] | None = None):
    """Measure `machine`'s response (every knob probed in turn, through the safety layer); recorded.

    Returns (measurement, measurement id). The machine is locked for the duration.
    """
    from .response import ResponseSettings, measure_response as measure

    opened = open_machine(machine, connect=False)
    with _holding(opened, "measure-response"):
        opened.connect()
        store = open_store()
        machine_row = store.add_machine(**opened.record)
        snap = unique_snapshot_path(opened.name, f"-response-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        result = measure(opened.plant, opened.interlocks, snap,
                         {"machine_file": str(Path(opened.path).resolve()) if opened.path else None, "machine": opened.name},
                         settings or ResponseSettings(), on_event)
    row = store.add_measurement(machine_row.id, opened.definition.name, "response", operator, result.status,
                                {**result.as_dict(), "machine": opened.name, "machine_path": opened.record.get("path"),
                                 "snapshot": str(snap)})
    return result, row.id


def measurement(measurement_id: int) -> dict:
    """A recorded measurement with its machine, as a JSON-friendly dict (ConfigError if unknown)."""
    from .store import MachineRow, MeasurementRow, row_dict

    store = open_store()
    row = store.get(MeasurementRow, measurement_id)
    if row is None:
        raise ConfigError(f"--measurement: no measurement with id {measurement_id}")
    out = row_dict(row)
    machine_row = store.get(MachineRow, row.machine_id)
    out["machine"] = {"name": machine_row.name, "kind": machine_row.kind, "path": machine_row.path, "content": machine_row.content}
    return out


def calibrate(machine: str | None, measurement_id: int, out: Path) -> dict:
    """Fit the machine's setup (lattice) to a recorded response measurement; write into `out`
    the calibrated setup, a machine file with the fitted knob scales and a report."""
    import yaml

    record = measurement(measurement_id)
    if record["kind"] != "response":
        raise ConfigError(f"--measurement {measurement_id}: a {record['kind']} measurement, not a response")
    machine_arg = machine or record["machine"]["path"]
    if not machine_arg:
        raise ConfigError(f"--machine: measurement {measurement_id} was not taken on a machine file; pass --machine")
    opened = open_machine(machine_arg, connect=False)
    if opened.machine_file is None or opened.path is None:
        raise ConfigError("--machine: calibration needs a machine file (a simulated machine has no wiring to fit)")
    if record["data"].get("machine") != opened.name:
        raise ConfigError(f"--measurement {measurement_id}: taken on {record['data'].get('machine')!r}, not on {opened.name!r}")
    fitted = opened.definition.calibrate(opened.setup, record["data"], out)
    if fitted is None:
        raise ConfigError(f"task {opened.definition.name} cannot calibrate its setup from a response measurement")
    factors = fitted["knob_factors"]
    content = yaml.safe_load(Path(opened.path).read_text())
    knobs = content.get("knobs", content.get("correctors"))
    for knob, factor in zip(knobs, factors):
        # One calibrated unit has the effect the setup's model assigns to one unit.
        knob["scale"] = float(knob["scale"]) / factor if abs(factor) >= 1e-3 else float(knob["scale"])
    content["name"] = f"{opened.name}-calibrated"
    content["lattice"] = Path(fitted["setup_file"]).name
    content["description"] = f"{opened.machine_file.description} - calibrated from measurement {measurement_id}"
    machine_file = out / "machine.yaml"
    machine_file.write_text(f"# {content['name']}: written by `tbsac calibrate` from measurement {measurement_id}.\n"
                            f"# Knob scales divided by the fitted effect per unit. {fitted['verdict']}\n"
                            + yaml.safe_dump(content, sort_keys=False))
    report = {**fitted["report"], "measurement": measurement_id, "machine": opened.name, "machine_file": str(machine_file),
              "setup_file": str(fitted["setup_file"]), "good": fitted["good"], "verdict": fitted["verdict"]}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(
        f"# Calibration of {opened.name} (measurement {measurement_id})\n\n**{fitted['verdict']}**\n\n"
        + fitted.get("markdown", "") + f"\nFiles: {Path(fitted['setup_file']).name} (calibrated setup), {machine_file.name} "
        "(machine file with the fitted knob scales), report.json.\n")
    return report
