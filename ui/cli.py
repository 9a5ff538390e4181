"""The ``tbsac`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from simulators.config import ConfigError

app = typer.Typer(
    help="Safe RL beam tuning: train, evaluate and deploy trend-based SAC agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train an agent in simulation.", no_args_is_help=True)
evaluate_app = typer.Typer(help="Evaluate an agent against the baselines.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")

# Pipes get a wide console so tables are not truncated in logs and captured output.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

RFQ_GAMMA = 0.8  # short horizon: improvements are paid at once; 0.8 beat 0.95 in validation
LatticeOpt = typer.Option("cafe2-cm1", "--lattice", "-l", help="Shipped lattice name or path to a lattice YAML.")
ErrorsOpt = typer.Option("test", "--errors", "-e", help="Error preset (train, test, hard) or path to an error-model YAML.")


def _load(lattice: str, errors: str):
    from simulators.beamline.errors import load_error_model
    from simulators.beamline.lattice import load_lattice

    return load_lattice(lattice), load_error_model(errors)


@train_app.command("orbit")
def train_orbit_cmd(
    lattice: str = LatticeOpt,
    errors: str = typer.Option("train", "--errors", "-e", help="Error preset or YAML used for training."),
    eval_errors: str = typer.Option("test", "--eval-errors", help="Error preset for the periodic evaluation."),
    steps: int = typer.Option(20_000, "--steps", min=1000, help="Environment steps."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/orbit"), "--out", help="Output directory."),
    arch: str = typer.Option("tbsac", "--arch", help="tbsac (trend convolutions) or mlp (ablation)."),
    eval_every: int = typer.Option(1000, "--eval-every", min=100),
    eval_episodes: int = typer.Option(100, "--eval-episodes", min=1),
    stop_at_bar: bool = typer.Option(False, "--stop-at-bar", help="Stop at the first evaluation meeting the acceptance bar."),
):
    """Train TBSAC on orbit correction; writes policy.pt, checkpoints/, tensorboard/ and training.json."""
    from controller.agents import ARCHITECTURES
    from controller.training import train_orbit

    if arch not in ARCHITECTURES:
        raise ConfigError(f"--arch: unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    lat, em = _load(lattice, errors)
    _, eval_em = _load(lattice, eval_errors)
    _train_recorded("orbit", lat, em, eval_em, arch, steps, seed, out, eval_every, eval_episodes, lambda: train_orbit(
        lat, em, steps, seed, out, arch=arch, eval_error_model=eval_em, eval_every=eval_every,
        eval_episodes=eval_episodes, stop_at_bar=stop_at_bar,
    ))


def _train_recorded(task, lat, em, eval_em, arch, steps, seed, out, eval_every, eval_episodes, train, config=None):
    """Run `train()` as a training run recorded in the store; register its policy."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("controller.training").setLevel(logging.INFO)  # one line per evaluation
    store = _store()
    run_row = store.start_training_run(
        task=task, lattice=lat.name, errors=em.name, arch=arch, steps=steps, seed=seed, out_dir=str(out.resolve()),
        config={"eval_errors": eval_em.name, "eval_every": eval_every, "eval_episodes": eval_episodes, **(config or {})},
    )
    try:
        result = train()
    except BaseException:
        store.finish_training_run(run_row.id, "failed", {}, [])
        raise
    from controller.policy import Policy, file_sha256

    store.finish_training_run(run_row.id, "completed", {
        "best_step": result.best_step, "best": result.best_summary, "first_bar_step": result.first_bar_step,
        "first_bar_seconds": result.first_bar_seconds, "wall_seconds": result.wall_seconds}, result.curves)
    trained = Policy.load(result.policy_path)
    store.add_policy(result.policy_path, file_sha256(result.policy_path), trained.metadata, training_run_id=run_row.id)
    console.print(f"best checkpoint: step {result.best_step}: {json.dumps(result.best_summary)}")
    if result.first_bar_step is not None:
        console.print(f"acceptance bar first met at step {result.first_bar_step} after {result.first_bar_seconds} s")
    else:
        console.print("acceptance bar not met during training")
    console.print(f"wall time {result.wall_seconds} s; policy: {result.policy_path}")


def _store():
    """The session store (TBSAC_DATABASE_URL or SQLite in the data directory)."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from controller.store import Store

    try:
        return Store()
    except (ArgumentError, OperationalError) as exc:
        raise ConfigError(f"session store: cannot open database ({str(exc).splitlines()[0]})") from None


def _results_table(summary: dict) -> Table:
    table = Table(title=f"{summary['task']} on {summary['lattice']}, errors '{summary['errors']}', "
                  f"{summary['episodes']} machines from seed {summary['seed']}")
    for col in ("method", "success", "final RMS median (mm)", "final RMS p95 (mm)", "steps median", "steps p95", "initial RMS median (mm)", "beam lost"):
        table.add_column(col, justify="right")
    for name, r in summary["results"].items():
        table.add_row(
            name, f"{r['success_rate']:.0%}", str(r["final_rms_mm"]["median"]), str(r["final_rms_mm"]["p95"]),
            str(r["steps"]["median"]), str(r["steps"]["p95"]), str(r["initial_rms_mm"]["median"]), str(r["beam_lost"]),
        )
    return table


@train_app.command("rfq")
def train_rfq_cmd(
    lattice: str = typer.Option("lpi", "--lattice", "-l", help="Injector lattice name or path."),
    errors: str = typer.Option("train", "--errors", "-e", help="Injector error preset used for training."),
    eval_errors: str = typer.Option("test", "--eval-errors", help="Error preset for the periodic evaluation."),
    steps: int = typer.Option(150_000, "--steps", min=1000, help="Environment steps."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/rfq"), "--out", help="Output directory."),
    arch: str = typer.Option("mlp", "--arch", help="mlp (the transmission trend is a vector, not a BPM image)."),
    eval_every: int = typer.Option(5000, "--eval-every", min=100),
    eval_episodes: int = typer.Option(20, "--eval-episodes", min=1),
    gamma: float = typer.Option(RFQ_GAMMA, "--gamma", min=0.0, max=1.0, help="Discount factor."),
    stop_at_bar: bool = typer.Option(False, "--stop-at-bar", help="Stop at the first evaluation meeting the acceptance bar."),
):
    """Train an agent on RFQ transmission tuning; writes policy.pt, checkpoints/, tensorboard/ and training.json."""
    from controller.training import train_rfq
    from simulators.injector.model import load_injector
    from simulators.injector.task import load_injector_errors

    if arch != "mlp":
        raise ConfigError(f"--arch: {arch!r} is not available for the RFQ task; use mlp")
    lat, em, eval_em = load_injector(lattice), load_injector_errors(errors), load_injector_errors(eval_errors)
    _train_recorded("rfq", lat, em, eval_em, arch, steps, seed, out, eval_every, eval_episodes, lambda: train_rfq(
        lat, em, steps, seed, out, arch, eval_em, eval_every, eval_episodes, stop_at_bar=stop_at_bar,
        sac_overrides={"gamma": gamma},
    ), config={"gamma": gamma})


@evaluate_app.command("orbit")
def evaluate_orbit_cmd(
    lattice: str = LatticeOpt,
    policy: str = typer.Option("pretrained", "--policy", "-p", help="Policy file, or 'pretrained' for the shipped one."),
    episodes: int = typer.Option(100, "--episodes", "-n", min=1),
    seed: int = typer.Option(1000, "--seed"),
    errors: str = ErrorsOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG path (default orbit-<lattice>-<errors>.png)."),
):
    """Run the agent and every baseline on the same machines and compare them."""
    from controller.evaluation import evaluate_orbit, plot_orbit_evaluation
    from controller.policy import Policy
    from simulators.beamline.task import OrbitTaskConfig

    lat, em = _load(lattice, errors)
    agent = Policy.load(policy, lattice=lat)
    config = OrbitTaskConfig(**agent.metadata.get("task_config", {}))
    summary, runs = evaluate_orbit(lat, em, agent, episodes, seed, config)
    from controller.recording import register_policy

    store = _store()
    store.add_evaluation(register_policy(store, agent), summary)
    if as_json:
        print(json.dumps(summary))
        return
    console.print(_results_table(summary))
    path = plot or Path(f"orbit-{lat.name}-{em.name}.png")
    plot_orbit_evaluation(lat, runs, path, f"{lat.name}, errors '{em.name}'")
    console.print(f"plot written to {path}")


@evaluate_app.command("rfq")
def evaluate_rfq_cmd(
    lattice: str = typer.Option("lpi", "--lattice", "-l", help="Injector lattice name or path."),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Agent policy file or 'pretrained' (without it: baselines only)."),
    episodes: int = typer.Option(100, "--episodes", "-n", min=1),
    seed: int = typer.Option(1000, "--seed"),
    errors: str = typer.Option("test", "--errors", "-e", help="train or test"),
    budget: int = typer.Option(30, "--budget", min=2, max=200, help="Steps each method may spend."),
    methods: str = typer.Option("nelder_mead,xopt_bo,random", "--methods", help="Comma-separated baselines to run."),
    as_json: bool = typer.Option(False, "--json"),
):
    """RFQ transmission: agent and optimisers (Nelder-Mead, Xopt BO, random) on the same injectors."""
    from controller.rfq import RFQ_METHODS, evaluate_rfq
    from simulators.injector.model import load_injector
    from simulators.injector.task import load_injector_errors

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in RFQ_METHODS or m == "agent"]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from nelder_mead, xopt_bo, random")
    lat, em = load_injector(lattice), load_injector_errors(errors)
    agent = None
    if policy:
        from controller.policy import Policy

        agent = Policy.load(policy, lattice=lat)  # refuses an orbit policy or other knobs
    summary, _ = evaluate_rfq(lat, em, agent, episodes, seed, budget, (("agent",) if agent else ()) + chosen)
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"RFQ transmission on {lat.name}, errors '{em.name}', {episodes} injectors from seed {seed}, "
                        f"{budget} steps; best achievable median {summary['best_achievable']['median']}")
    for col in ("method", "final T median", "final / best median", "steps to 85 % (reached)", "steps to 0.9 best (reached)"):
        table.add_column(col, justify="right")
    for name, r in summary["results"].items():
        table.add_row(name, str(r["final_transmission"]["median"]), str(r["fraction_of_best"]["median"]),
                      f"{r['steps_to_85']['median']} ({r['steps_to_85']['reached']})",
                      f"{r['steps_to_90pct_best']['median']} ({r['steps_to_90pct_best']['reached']})")
    console.print(table)


@app.command()
def demo(
    seed: int = typer.Option(7, "--seed", help="Which mis-steered machine to draw."),
    plot: Path = typer.Option(Path("tbsac-demo.png"), "--plot"),
):
    """Zero-shot orbit correction of a virtual cafe2-cm1 over EPICS, behind the safety layer.

    Starts the virtual IOC (hidden 'test' errors) in the background, runs the pretrained
    agent over Channel Access through the safety layer, prints before/after, stops the
    IOC; then compares agent and SVD on the same machine in simulation and plots it.
    """
    import tempfile

    from controller.evaluation import evaluate_orbit, plot_orbit_evaluation
    from controller.policy import Policy
    from controller.session import run_session
    from hardware.ioc import free_port, loopback_environment, start_virtual_ioc
    from safety.guard import InterlockRule
    from simulators.beamline.task import OrbitTaskConfig

    lat, em = _load("cafe2-cm1", "test")
    agent = Policy.load("pretrained", lattice=lat)
    port = free_port()
    os.environ.update(loopback_environment(port))
    work = Path(tempfile.mkdtemp(prefix="tbsac-demo-"))
    console.print(f"starting the virtual cafe2-cm1 IOC on 127.0.0.1:{port} (hidden errors: 'test', seed {seed})")
    ioc_proc = start_virtual_ioc("cafe2-cm1", seed, "test", port, put_log=work / "puts.jsonl")
    try:
        machine, path, _, plant = _connect("virtual-cafe2-cm1")
        result = run_session(
            plant, agent, interlocks=[InterlockRule(i.name, i.rule, i.threshold) for i in machine.interlocks],
            snapshot_path=work / "snapshot.json",
            snapshot_context={"machine_file": str(Path(str(path)).resolve()), "machine": machine.name},
        )
    finally:
        ioc_proc.terminate()
        ioc_proc.wait(10)
    table = Table(title="over EPICS Channel Access, through the safety layer")
    for col in ("machine", "RMS before (mm)", "RMS after (mm)", "steps", "wall time (s)", "safety trips", "status"):
        table.add_column(col, justify="right")
    table.add_row(machine.name, f"{result.initial_rms_mm:.2f}", f"{result.final_rms_mm:.2f}", str(result.steps),
                  f"{result.wall_s:.1f}", str(len(result.trips)), result.status)
    console.print(table)

    config = OrbitTaskConfig(**agent.metadata.get("task_config", {}))
    summary, runs = evaluate_orbit(lat, em, agent, 1, seed, config)
    table = Table(title=f"in simulation: the same machine (seed {seed}), every method")
    for col in ("method", "RMS before (mm)", "RMS after (mm)", "steps", "corrected"):
        table.add_column(col, justify="right")
    for name, eps in runs.items():
        ep = eps[0]
        table.add_row(name, f"{ep.initial_rms_mm:.2f}", f"{ep.final_rms_mm:.2f}", str(ep.steps), "yes" if ep.success else "no")
    console.print(table)
    plot_orbit_evaluation(lat, runs, plot, f"tbsac demo: cafe2-cm1, machine seed {seed}")
    console.print(f"plot written to {plot}")
    if result.status != "completed":
        raise typer.Exit(3)


@app.command()
def ioc(
    lattice: str = LatticeOpt,
    seed: int = typer.Option(0, "--seed", help="Which hidden machine errors to draw."),
    errors: str = ErrorsOpt,
    port: int = typer.Option(5064, "--port", help="Channel Access server port (loopback only)."),
    ramp: float = typer.Option(0.2, "--ramp", min=0.0, help="Magnet ramp time in s; puts complete when it ends."),
    put_log: Optional[Path] = typer.Option(None, "--put-log", help="JSON-lines file recording every put received."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="PV prefix (default VCAFE2:CMk)."),
):
    """Serve a simulated cryomodule or injector with hidden errors as a real EPICS IOC (softioc)."""
    from hardware.ioc import is_injector_lattice, serve

    # Fail with a clear message before starting EPICS.
    if is_injector_lattice(lattice):
        from simulators.injector.model import load_injector
        from simulators.injector.task import load_injector_errors

        load_injector(lattice), load_injector_errors(errors)
    else:
        _load(lattice, errors)
    serve(lattice, seed, errors, port, ramp, put_log, prefix)


def _connect(machine_arg: str):
    """Load a machine file, its lattice, and connect to it."""
    from hardware.epics_plant import EpicsPlant
    from hardware.machine import load_machine, load_machine_lattice

    machine, path = load_machine(machine_arg)
    lattice = load_machine_lattice(machine, path)
    return machine, path, lattice, EpicsPlant(machine, path).connect()


def _terminal_approver(machine):
    def approve(current, proposed, names) -> bool:
        table = Table(title="proposed step")
        for col in ("knob", "now (A)", "proposed (A)", "change (A)"):
            table.add_column(col, justify="right")
        for c, now, new in zip(machine.correctors, current, proposed):
            table.add_row(c.name, f"{now * c.scale:+.3f}", f"{new * c.scale:+.3f}", f"{(new - now) * c.scale:+.3f}")
        err_console.print(table)
        return typer.confirm("apply this step?", default=False, err=True)

    return approve


@app.command()
def run(
    machine: str = typer.Option(..., "--machine", "-m", help="Machine file (or shipped name, e.g. virtual-cafe2-cm1)."),
    policy: str = typer.Option("pretrained", "--policy", "-p"),
    mode: str = typer.Option("auto", "--mode", help="auto, approve (confirm every step) or dry-run (never writes)."),
    as_json: bool = typer.Option(False, "--json"),
    max_steps: int = typer.Option(60, "--max-steps", min=1, help="Safety limit on writes."),
    max_excursion: float = typer.Option(10.0, "--max-excursion", help="Orbit: largest change of any corrector from its start, simulator units."),
    max_excursion_steps: Optional[float] = typer.Option(None, "--max-excursion-steps", min=0.1, help="RFQ: largest change of any knob from its start, in its largest steps (default 15)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Where to keep the starting settings (default in the data directory)."),
    operator: str = typer.Option(os.environ.get("USER", "operator"), "--operator", help="Who runs the session (recorded)."),
):
    """Tune a machine over EPICS with a policy, through the safety layer (orbit or RFQ, by machine file)."""
    import signal
    import time as _time

    from controller.paths import snapshot_dir
    from controller.policy import Policy
    from controller.session import RFQ_MAX_EXCURSION_STEPS, run_session
    from safety.guard import MODES, InterlockRule, SafetyConfig

    if mode not in MODES:
        raise ConfigError(f"--mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    from controller.recording import SessionRecorder, machine_record_from_file

    machine_file, path, lattice, plant = _connect(machine)
    agent = Policy.load(policy, lattice=lattice)
    snap = snapshot or snapshot_dir() / f"{machine_file.name}-{_time.strftime('%Y%m%dT%H%M%S')}.json"
    recorder = SessionRecorder(_store(), machine_record_from_file(machine_file, path), agent, operator, mode, str(snap))
    guards = []
    signal.signal(signal.SIGINT, lambda *_: guards and guards[0].abort("operator abort (Ctrl-C)"))

    def on_event(event) -> None:
        recorder.on_event(event)
        if event.kind == "warning":  # the operator should see it now, not only in the log
            err_console.print(f"tbsac: warning: {event.reason}", markup=False, highlight=False, soft_wrap=True)

    result = run_session(
        plant, agent, mode=mode,
        safety=SafetyConfig(max_steps=max_steps, max_excursion=max_excursion,
                            max_excursion_steps=(max_excursion_steps or RFQ_MAX_EXCURSION_STEPS) if machine_file.task == "rfq" else None),
        interlocks=[InterlockRule(i.name, i.rule, i.threshold) for i in machine_file.interlocks],
        snapshot_path=snap, snapshot_context={"machine_file": str(Path(path).resolve()), "machine": machine_file.name},
        approver=_terminal_approver(machine_file) if mode == "approve" else None,
        guard_ready=guards.append, on_step=recorder.on_step, on_event=on_event,
    )
    recorder.finish(result)
    if as_json:
        print(json.dumps({k: v for k, v in result.summary().items() if k != "status"}))
    else:
        change = (f"transmission {result.initial_transmission} -> {result.final_transmission}" if result.task == "rfq"
                  else f"RMS {result.initial_rms_mm} -> {result.final_rms_mm} mm")
        console.print(f"session {recorder.session_id} on {machine_file.name}: {result.status}; {change} "
                      f"in {result.steps} steps ({result.wall_s} s); snapshot {result.snapshot}")
    if result.status not in ("completed", "dry-run"):
        why = result.trips[-1] if result.trips else result.status.replace("_", " ")
        err_console.print(f"tbsac: session {result.status}: {why}; restored: {'yes' if result.restored else 'NO'}; "
                          f"snapshot: {result.snapshot}", markup=False, highlight=False, soft_wrap=True)
        if any("connection lost" in t for t in result.trips):
            # libca's context teardown at exit blocks on the TCP circuit of a frozen
            # IOC; everything is recorded and the snapshot is on disk, so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        raise typer.Exit(3)


@app.command()
def restore(
    snapshot: Path = typer.Argument(..., help="Snapshot file written by `tbsac run`."),
    machine: Optional[str] = typer.Option(None, "--machine", "-m", help="Machine file (default: the one recorded in the snapshot)."),
):
    """Put a machine back to the settings recorded in a snapshot, and verify them."""
    from safety.guard import read_snapshot, restore_snapshot
    from simulators.plant import PlantFault

    try:
        blob = read_snapshot(snapshot)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{snapshot}: not a readable snapshot ({exc})") from None
    machine_arg = machine or blob.get("machine_file")
    if not machine_arg:
        raise ConfigError(f"{snapshot}: field 'machine_file' missing; pass --machine")
    _, _, _, plant = _connect(machine_arg)
    try:
        restore_snapshot(plant, blob)
    except (PlantFault, ValueError) as exc:
        err_console.print(f"tbsac: restore failed: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(3)
    console.print(f"restored {len(blob['knobs'])} settings from {snapshot} and verified them by read-back")


@app.command()
def info():
    """Shipped lattices, error presets and pretrained policies."""
    from controller.policy import POLICY_DIR
    from simulators.beamline.errors import preset_names
    from simulators.beamline.lattice import shipped_lattices

    from controller.paths import data_dir
    from controller.store import default_url
    from hardware.machine import MACHINE_DIR

    console.print(f"data directory: {data_dir()}")
    console.print(f"session store: {default_url()}")
    console.print(f"machine files: {', '.join(sorted(p.name[:-5] for p in MACHINE_DIR.iterdir() if p.name.endswith('.yaml')))}")
    from simulators.injector.model import shipped_injectors
    from simulators.injector.task import INJECTOR_PRESETS

    console.print(f"lattices: {', '.join(shipped_lattices())}")
    console.print(f"error presets: {', '.join(preset_names())}")
    console.print(f"injector lattices (RFQ task): {', '.join(shipped_injectors())}; "
                  f"injector error presets: {', '.join(INJECTOR_PRESETS)}")
    console.print(f"pretrained policies: {', '.join(sorted(p.name for p in POLICY_DIR.iterdir() if p.name.endswith('.pt')))}")


@app.command("replay")
def replay_cmd(
    session: int = typer.Argument(..., help="Session id (see the console or the server's /api/sessions)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Audit a recorded session: re-run its policy on every recorded observation."""
    from controller.replay import replay

    report = replay(_store(), session)
    if as_json:
        print(json.dumps(report))
    else:
        table = Table(title=f"session {report['session']} ({report['status']}), policy {report['policy']}")
        rfq = any(r["transmission"] is not None for r in report["table"])
        for col in ("step", "transmission" if rfq else "RMS (mm)", "reward", "action by", "clamped by safety", "action reproduced"):
            table.add_column(col, justify="right")
        for r in report["table"]:
            metric = r["transmission"] if rfq else r["rms_mm"]
            table.add_row(str(r["step"]), f"{metric:.3f}" if metric is not None else "-", f"{r['reward']:.2f}", r["by"],
                          "yes" if r["clamped"] else "no", "yes" if r["reproduced"] else "NO")
        console.print(table)
        console.print(f"{report['reproduced']} of {report['steps']} actions reproduced")
    if report["reproduced"] != report["steps"]:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    session: int = typer.Argument(...),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default session-N.csv/.parquet)."),
):
    """Export a session's steps (one row per step, named columns)."""
    from controller.replay import export

    path = export(_store(), session, fmt, out or Path(f"session-{session}.{fmt}"))
    console.print(f"written {path}")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8765, "--port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="TBSAC_OPERATOR_TOKEN", help="Operator token for write requests."),
    sim_step_interval: float = typer.Option(0.0, "--sim-step-interval", help="Pause between steps on simulated machines, s."),
):
    """The control server: owns machine connections; consoles come and go."""
    import secrets

    import uvicorn

    from ui.server import create_app

    # A control loop waking from network I/O gets the GIL back sooner (default 5 ms).
    sys.setswitchinterval(0.0005)
    if not token:
        token = secrets.token_urlsafe(16)
        err_console.print(f"operator token: {token}", markup=False, highlight=False)
    uvicorn.run(create_app(_store(), token, sim_step_interval=sim_step_interval), host=host, port=port, log_level="warning")


@app.command("console")
def console_cmd(
    server: str = typer.Option("http://127.0.0.1:8765", "--server", envvar="TBSAC_SERVER_URL", help="Control server address."),
    port: int = typer.Option(8501, "--port", help="Port of the console (binds 127.0.0.1)."),
    host: str = typer.Option("127.0.0.1", "--host"),
):
    """The operator console (Streamlit), talking to the control server over HTTP."""
    from ui.console import __file__ as console_init

    app_path = Path(console_init).parent / "app.py"
    env = {**os.environ, "TBSAC_SERVER_URL": server}
    cmd = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.port", str(port), "--server.address", host,
           "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    sys.stdout.flush()
    # Become Streamlit (not its parent): a stop signal must reach the server, not orphan it.
    os.execve(sys.executable, cmd, env)


def main() -> None:
    """Entry point: user errors exit with code 2 and one line, no traceback."""
    try:
        app()
    except ConfigError as exc:
        err_console.print(f"tbsac: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
