"""The ``tbsac`` command line: a thin shell over :mod:`controller.api`.

Every command dispatches through the task registry: ``tbsac info`` lists the tasks.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from controller.api import ConfigError

app = typer.Typer(
    help="Safe RL tuning: train, evaluate and deploy trend-based SAC agents on any registered task.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Pipes get a wide console so tables are not truncated in logs and captured output.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

DEMO_MACHINE = "virtual-cafe2-cm1"  # the embedded default of `tbsac demo`
TaskArg = typer.Argument(..., help="Registered task (`tbsac info` lists them).")
LatticeOpt = typer.Option(None, "--lattice", "-l", "--crop", help="Shipped lattice (setup) name or path (default: the "
                          "task's first; --crop names the crop task's setups, wheat or maize).")


def _error(message: str) -> None:
    err_console.print(f"tbsac: {message}", markup=False, highlight=False, soft_wrap=True)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def train(
    task: str = TaskArg,
    lattice: Optional[str] = LatticeOpt,
    errors: str = typer.Option("train", "--errors", "-e", help="Error preset or YAML used for training."),
    eval_errors: Optional[str] = typer.Option(None, "--eval-errors", help="Error preset for the periodic evaluation "
                                              "(default: the task's, e.g. test; the crop's held-out years stay unseen: train)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1000, help="Environment steps (default: the task's)."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default runs/<task>)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Network (default: the task's; `tbsac info` lists each task's)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", min=100),
    eval_episodes: Optional[int] = typer.Option(None, "--eval-episodes", min=1),
    gamma: Optional[float] = typer.Option(None, "--gamma", min=0.0, max=1.0, help="Discount factor (default: the task's)."),
    algo: Optional[str] = typer.Option(None, "--algo", help="sac, tqc (distributional SAC, sb3-contrib) or ddpg; default: the task's."),
    risk_weight: Optional[float] = typer.Option(None, "--risk-weight", min=0.0, max=0.99, help="tqc: weight of the CVaR (worst "
                                                "25 %) of the return distribution in the actor's objective (0 = risk-neutral)."),
    privileged_critic: Optional[bool] = typer.Option(None, "--privileged-critic/--plain-critic", help="The critics also "
                                                     "read what only the simulator knows (the task's privileged features: "
                                                     "an asymmetric actor-critic; the actor never does); default: the task's."),
    action_repeat: Optional[int] = typer.Option(None, "--action-repeat", min=1, help="Training only: hold each action for "
                                                "this many task steps (frame skipping; rewards summed, the discount per "
                                                "held action). Evaluations and runs act every step."),
    paired_reference: Optional[bool] = typer.Option(None, "--paired-reference", help="Training only: each reward is "
                                                    "the agent's minus the task's reference policy's on the same episode "
                                                    "(a twin simulation; the best policy is unchanged)."),
    stop_at_bar: bool = typer.Option(False, "--stop-at-bar", help="Stop at the first evaluation meeting the acceptance bar."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Fine-tune: start from a policy file or 'pretrained' "
                                            "(the shipped policy of the lattice, or of the lattice it was calibrated from)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", min=0.1, help="Stop at the first evaluation after this "
                                                "wall time (the best checkpoint so far is kept)."),
    task_settings: Optional[list[str]] = typer.Option(None, "--set", help="A task setting KEY=VALUE (repeatable; the value "
                                                      "as YAML), e.g. --set base=mpc for the battery's residual control."),
):
    """Train an agent in simulation; writes policy.pt, checkpoints/, tensorboard/ and training.json."""
    from controller import api

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("controller.training").setLevel(logging.INFO)  # one line per evaluation
    overrides = {key: value for key, value in (("gamma", gamma), ("algorithm", algo), ("risk_weight", risk_weight),
                                               ("privileged_critic", privileged_critic), ("action_repeat", action_repeat),
                                               ("paired_reference", paired_reference))
                 if value is not None}
    result = api.train(task, lattice, errors, eval_errors, steps, seed, out or Path("runs") / task, arch, eval_every,
                       eval_episodes, stop_at_bar, overrides or None, init_from=init_from, max_minutes=max_minutes,
                       task_config=api.parse_settings(task_settings or [], "--set"))
    console.print(f"best checkpoint: step {result.best_step}: {json.dumps(result.best_summary)}")
    if result.first_bar_step is not None:
        console.print(f"acceptance bar first met at step {result.first_bar_step} after {result.first_bar_seconds} s")
    else:
        console.print("acceptance bar not met during training")
    console.print(f"wall time {result.wall_seconds} s; policy: {result.policy_path}")


@app.command()
def evaluate(
    task: str = TaskArg,
    lattice: Optional[str] = LatticeOpt,
    policy: str = typer.Option("pretrained", "--policy", "-p", help="Policy file, 'pretrained' (shipped) or 'none' (baselines only)."),
    episodes: int = typer.Option(100, "--episodes", "-n", "--seasons", min=1, help="Machines (crop: seasons) to run."),
    seed: int = typer.Option(1000, "--seed"),
    errors: str = typer.Option("test", "--errors", "-e", help="Error preset or YAML."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated baselines (default: the task's; '' for none)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=2, max=200, help="Steps each method may spend (default: the task's)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object and nothing else."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG path (default <task>-<lattice>-<errors>.png, if the task plots)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Split the machines over this many Ray workers (same numbers "
                                "as a serial run; needs the cluster extra)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray://HOST:PORT); default local Ray."),
):
    """Run the agent and the task's baselines on the same simulated machines and compare them."""
    from controller import api

    chosen = None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
    ev = api.evaluate(task, lattice, None if policy == "none" else policy, episodes, seed, errors, chosen, budget,
                      workers, address)
    if as_json:
        print(json.dumps(ev.summary))
        return
    columns, rows = ev.definition.results_table(ev.summary)
    console.print(_table(f"{task} on {ev.setup.name}, errors '{ev.errors.name}', {episodes} machines from seed {seed}",
                         columns, rows))
    path = ev.definition.plot_evaluation(ev.setup, ev.runs, plot or Path(f"{task}-{ev.setup.name}-{ev.errors.name}.png"),
                                         f"{ev.setup.name}, errors '{ev.errors.name}'")
    if path:
        console.print(f"plot written to {path}")


@app.command()
def demo(
    seed: int = typer.Option(7, "--seed", help="Which mis-steered machine to draw."),
    plot: Path = typer.Option(Path("tbsac-demo.png"), "--plot"),
):
    """Zero-shot tuning of a virtual machine (default cafe2-cm1) over EPICS, behind the safety layer.

    Starts the virtual IOC (hidden 'test' errors) in the background, runs the pretrained
    agent over Channel Access through the safety layer, prints before/after, stops the
    IOC; then compares agent and baselines on the same machine in simulation and plots it.
    """
    import tempfile

    from controller import api

    task, lattice = api.machine_task(DEMO_MACHINE)
    port = api.free_port()
    os.environ.update(api.loopback_environment(port))
    work = Path(tempfile.mkdtemp(prefix="tbsac-demo-"))
    console.print(f"starting the virtual {lattice} IOC on 127.0.0.1:{port} (hidden errors: 'test', seed {seed})")
    ioc_proc = api.start_virtual_ioc(lattice, seed, "test", port, put_log=work / "puts.jsonl")
    try:
        result, session_id, opened = api.run_on_machine(DEMO_MACHINE, "pretrained", "auto", os.environ.get("USER", "operator"),
                                                        snapshot=work / "snapshot.json")
    finally:
        ioc_proc.terminate()
        ioc_proc.wait(10)
    metric = opened.definition.metrics[0]
    console.print(_table("over EPICS Channel Access, through the safety layer",
                         ["machine", f"{metric.title} before", f"{metric.title} after", "steps", "wall time (s)", "safety trips", "status"],
                         [[opened.name, f"{result.initial:.3f}", f"{result.final:.3f}", str(result.steps), f"{result.wall_s:.1f}",
                           str(len(result.trips)), result.status]]))
    ev = api.evaluate(task, lattice, "pretrained", 1, seed, "test")
    columns, rows = ev.definition.results_table(ev.summary)
    console.print(_table(f"in simulation: the same machine (seed {seed}), every method", columns, rows))
    if ev.definition.plot_evaluation(ev.setup, ev.runs, plot, f"tbsac demo: {lattice}, machine seed {seed}"):
        console.print(f"plot written to {plot}")
    if result.status != "completed":
        raise typer.Exit(3)


@app.command()
def ioc(
    lattice: str = typer.Option(..., "--lattice", "-l", help="Lattice (setup) name or file of any registered task."),
    task: Optional[str] = typer.Option(None, "--task", help="Registered task (default: the one the lattice belongs to)."),
    seed: int = typer.Option(0, "--seed", help="Which hidden machine errors to draw."),
    errors: str = typer.Option("test", "--errors", "-e", help="Error preset of the task."),
    port: int = typer.Option(5064, "--port", help="Channel Access server port (loopback only)."),
    ramp: float = typer.Option(0.2, "--ramp", min=0.0, help="Supply ramp time in s; puts complete when it ends."),
    put_log: Optional[Path] = typer.Option(None, "--put-log", help="JSON-lines file recording every put received."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="PV prefix (default V + the lattice name, e.g. VCAFE2:CM1)."),
    foreign: Optional[int] = typer.Option(None, "--foreign", metavar="SEED", help="Serve a machine whose physics differs "
                                          "from the lattice file (drawn from SEED; the machine file stays the nominal one)."),
    period_s: Optional[float] = typer.Option(None, "--period-s", "--day-s", min=1e-3, help="Plants that run in periods "
                                             "(battery: settlement periods, default 1 s; bubble: control intervals, default "
                                             "0.05 s; crop: days, default 1 s): seconds per period."),
):
    """Serve a simulated machine with hidden errors as a real EPICS IOC (softioc)."""
    from controller import api

    if foreign is not None:
        errors, seed = "foreign", foreign
    api.serve_virtual_machine(lattice, seed, errors, port, ramp, put_log, prefix, task, period_s)


def _terminal_approver(machine):
    """Approve mode on a terminal: show every proposed change in engineering units."""
    knobs = machine.machine_file.knobs if machine.machine_file else None

    def approve(current, proposed, names) -> bool:
        table = Table(title="proposed step")
        unit = knobs[0].unit if knobs else "units"
        for col in ("knob", f"now ({unit})", f"proposed ({unit})", f"change ({unit})"):
            table.add_column(col, justify="right")
        scales = [k.scale for k in knobs] if knobs else [1.0] * len(names)
        for name, scale, now, new in zip(names, scales, current, proposed):
            table.add_row(name, f"{now * scale:+.4g}", f"{new * scale:+.4g}", f"{(new - now) * scale:+.4g}")
        err_console.print(table)
        return typer.confirm("apply this step?", default=False, err=True)

    return approve


@app.command()
def run(
    machine: str = typer.Option(..., "--machine", "-m", help="Machine file (or shipped name, e.g. virtual-cafe2-cm1)."),
    policy: str = typer.Option("pretrained", "--policy", "-p"),
    mode: str = typer.Option("auto", "--mode", help="auto, approve (confirm every step) or dry-run (never writes)."),
    as_json: bool = typer.Option(False, "--json"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Safety limit on writes (default: the task's, e.g. 60 for orbit, 200 for a battery day)."),
    max_excursion: Optional[float] = typer.Option(None, "--max-excursion", help="Largest change of any knob from its start, simulator units (default: the task's)."),
    max_excursion_steps: Optional[float] = typer.Option(None, "--max-excursion-steps", help="Largest change of any knob from its start, in its largest steps (default: the task's)."),
    snapshot: Optional[Path] = typer.Option(None, "--snapshot", help="Where to keep the starting settings (default in the data directory)."),
    operator: str = typer.Option(os.environ.get("USER", "operator"), "--operator", help="Who runs the session (recorded)."),
):
    """Tune a machine over EPICS with a policy, through the safety layer (the task comes from the machine file)."""
    import signal

    from controller import api

    guards = []
    signal.signal(signal.SIGINT, lambda *_: guards and guards[0].abort("operator abort (Ctrl-C)"))

    def on_event(event) -> None:
        if event.kind in ("warning", "mismatch", "knob_map"):  # the operator should see it now, not only in the log
            _error(f"{event.kind}: {event.reason}")

    result, session_id, opened = api.run_on_machine(
        machine, policy, mode, operator, max_steps, max_excursion, max_excursion_steps, snapshot,
        approver_for=_terminal_approver, on_event=on_event, guard_ready=guards.append)
    if as_json:
        print(json.dumps({k: v for k, v in result.summary().items() if k != "status"}))
    else:
        metric = opened.definition.metrics[0]
        console.print(f"session {session_id} on {opened.name}: {result.status}; {metric.label or metric.name} "
                      f"{result.initial} -> {result.final} ({metric.unit}) in {result.steps} steps ({result.wall_s} s); "
                      f"snapshot {result.snapshot}")
    if result.status not in ("completed", "dry-run"):
        stop = next((e.reason for e in reversed(result.events) if e.kind in ("mismatch", "stop")), None)
        why = result.trips[-1] if result.trips else stop or result.status.replace("_", " ")
        _error(f"session {result.status}: {why}; restored: {'yes' if result.restored else 'NO'}; snapshot: {result.snapshot}")
        if any("connection lost" in t for t in result.trips):
            # libca's context teardown at exit blocks on the TCP circuit of a frozen
            # IOC; everything is recorded and the snapshot is on disk, so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        raise typer.Exit(3)


@app.command("measure-response")
def measure_response_cmd(
    machine: str = typer.Option(..., "--machine", "-m", help="Machine file (or shipped name)."),
    probe_fraction: float = typer.Option(0.5, "--probe-fraction", min=0.01, max=1.0, help="Largest probe, as a fraction of each knob's largest step."),
    samples: int = typer.Option(4, "--samples", min=2, max=100, help="Readings averaged at every point."),
    sample_interval: float = typer.Option(0.12, "--sample-interval", min=0.0, help="Seconds between readings (an IOC refreshing at 10 Hz needs >= 0.1)."),
    max_margin_use: float = typer.Option(0.3, "--max-margin-use", min=0.01, max=0.9, help="Largest fraction of an interlock's margin a probe may use."),
    max_reading_change: float = typer.Option(0.1, "--max-reading-change", min=0.001, max=1.0, help="Largest change of any reading a probe may cause, as a fraction of its range (a BPM of +-20 mm: 0.1 = 4 mm)."),
    operator: str = typer.Option(os.environ.get("USER", "operator"), "--operator", help="Who measures (recorded)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure a machine's response: each knob up and down in turn through the safety layer, then restore."""
    from controller import api
    from controller.response import ResponseSettings

    def on_event(event) -> None:
        if event.kind in ("warning", "trip", "restore_failed"):
            _error(f"{event.kind}: {event.reason}")

    settings = ResponseSettings(probe_fraction, samples, sample_interval, 0.0, max_margin_use, max_reading_change)
    result, measurement_id = api.measure_response(machine, operator, settings, on_event)
    if as_json:
        print(json.dumps({"measurement": measurement_id, **result.as_dict()}))
    else:
        noise = [n for n in result.noise if n is not None]
        console.print(f"measurement {measurement_id} on {machine}: {result.status}; {len(result.knobs)} knobs x "
                      f"{len(result.readings)} readings; {result.writes} writes in {result.wall_s} s; "
                      f"reading noise median {statistics.median(noise) if noise else float('nan'):.4g}; "
                      f"probes {min(result.probes):.3g}-{max(result.probes):.3g} ({result.knob_units[0]}); "
                      f"export: tbsac export --measurement {measurement_id}")
    if result.status != "completed":
        _error(f"measurement {result.status}: {result.message}; the safety layer restored the starting settings")
        raise typer.Exit(3)


@app.command()
def calibrate(
    measurement: int = typer.Option(..., "--measurement", help="Id of a response measurement (tbsac measure-response)."),
    out: Path = typer.Option(..., "--out", help="Directory for lattice.yaml, machine.yaml, report.md/json, response.png."),
    machine: Optional[str] = typer.Option(None, "--machine", "-m", help="Machine file (default: the one the measurement was taken on)."),
):
    """Fit the machine's lattice to a measured response (differentiable Cheetah tracking); write calibrated files."""
    from controller import api

    report = api.calibrate(machine, measurement, out)
    console.print(f"{report['verdict']}")
    console.print(f"written {report['setup_file']}, {report['machine_file']}, {out / 'report.md'}, {report['plot']}")
    if not report["good"]:
        raise typer.Exit(3)


@app.command("sweep")
def sweep_cmd(
    file: Path = typer.Argument(..., help="Sweep file (YAML): task, lattices, errors, seeds, hyperparameters, train, evaluate."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray://HOST:PORT); default local Ray."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory of the trials' files (default runs/sweeps/<name>)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, help="At most this many trials at once "
                                                 "(default: as many as the CPUs allow)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (the trials' outcomes) at the end."),
):
    """Train and evaluate every trial of a sweep on Ray Tune; each is recorded in the store.

    Exit 1 if a trial failed twice (it is retried once)."""
    from controller import api

    logging.basicConfig(level=logging.WARNING)
    result = api.sweep(file, address, out, max_concurrent, on_progress=lambda line: err_console.print(
        line, markup=False, highlight=False, soft_wrap=True))
    outcomes = [{"trial": o.trial.name, "lattice": o.trial.lattice, "errors": o.trial.errors, "seed": o.trial.seed,
                 "hyperparameters": o.trial.hyperparameters, "status": o.status, "error": o.error,
                 **{k: o.metrics.get(k) for k in ("training_run_id", "policy_id", "evaluation_id", "bar_met", "step")}}
                for o in result.outcomes]
    if as_json:
        print(json.dumps({"sweep": result.name, "wall_seconds": result.wall_seconds, "trials": outcomes}))
    else:
        console.print(_table(f"sweep {result.name}: {len(outcomes)} trials in {result.wall_seconds} s",
                             ["trial", "status", "training run", "policy", "evaluation", "bar met"],
                             [[o["trial"], o["status"], str(o["training_run_id"] or "-"), str(o["policy_id"] or "-"),
                               str(o["evaluation_id"] or "-"), "-" if o["bar_met"] is None else str(o["bar_met"])]
                              for o in outcomes]))
        console.print(f"Ray Tune's records: {result.storage}")
    for o in result.failed:
        _error(f"trial {o.trial.name} failed after one retry: {o.error}")
    if result.failed:
        raise typer.Exit(1)


@app.command()
def promote(
    sweep: str = typer.Option(..., "--sweep", help="Name of a recorded sweep."),
    lattice: Optional[str] = typer.Option(None, "--lattice", "-l", help="Only this lattice (default: every lattice of the sweep)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be promoted, change nothing."),
    force: bool = typer.Option(False, "--force", help="Promote even if the best trial did not meet the task's bar."),
):
    """Make the best trial of a sweep (per lattice) the shipped 'pretrained' policy (the
    replaced file is kept in the data directory)."""
    from controller import api

    for entry in api.promote(sweep, lattice, dry_run, force):
        verb = "would promote" if dry_run else "promoted"
        best = ", ".join(f"{k} {v}" for k, v in entry["best"].items() if isinstance(v, (int, float)))
        console.print(f"{verb} run {entry['training_run']} ({entry['trial']}) to {entry['target']}: {best}")
        if entry["backup"]:
            console.print(f"  the replaced policy is kept at {entry['backup']}")


@app.command()
def restore(
    snapshot: Path = typer.Argument(..., help="Snapshot file written by `tbsac run`."),
    machine: Optional[str] = typer.Option(None, "--machine", "-m", help="Machine file (default: the one recorded in the snapshot)."),
):
    """Put a machine back to the settings recorded in a snapshot, and verify them."""
    from controller import api

    try:
        n = api.restore(snapshot, machine)
    except ConfigError:
        raise  # the user's input (exit 2), not a failed restore
    except (api.PlantFault, ValueError) as exc:
        _error(f"restore failed: {exc}")
        raise typer.Exit(3)
    console.print(f"restored {n} settings from {snapshot} and verified them by read-back")


@app.command()
def info():
    """Registered tasks with their lattices and error presets, machine files and pretrained policies."""
    from controller import api

    d = api.describe()
    console.print(f"data directory: {d['data_dir']}")
    console.print(f"session store: {d['store']}")
    table = Table(title="registered tasks")
    for col in ("task", "description", "lattices", "error presets", "baselines"):
        table.add_column(col)
    for name, t in d["tasks"].items():
        table.add_row(name, t["description"], ", ".join(t["lattices"]), ", ".join(t["error_presets"]), ", ".join(t["baselines"]))
    console.print(table)
    console.print(f"machine files: {', '.join(d['machines'])}")
    console.print(f"pretrained policies: {', '.join(d['policies'])}")


@app.command("replay")
def replay_cmd(
    session: int = typer.Argument(..., help="Session id (see the console or the server's /api/sessions)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Audit a recorded session: re-run its policy on every recorded observation."""
    from controller import api

    report = api.replay(api.open_store(), session)
    if as_json:
        print(json.dumps(report))
    else:
        metric = report["metric"] or "metric"
        rows = [[str(r["step"]), f"{r['metrics'].get(metric):.3f}" if r["metrics"].get(metric) is not None else "-",
                 f"{r['reward']:.2f}", r["by"], "yes" if r["clamped"] else "no", "yes" if r["reproduced"] else "NO"]
                for r in report["table"]]
        console.print(_table(f"session {report['session']} ({report['status']}), policy {report['policy']}",
                             ["step", metric, "reward", "action by", "clamped by safety", "action reproduced"], rows))
        console.print(f"{report['reproduced']} of {report['steps']} actions reproduced")
    if report["reproduced"] != report["steps"]:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    session: Optional[int] = typer.Argument(None, help="Session id."),
    fmt: str = typer.Option("csv", "--format", help="csv or parquet (a session's steps), md (its logbook report)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default session-N.csv/.parquet/.md, measurement-N.json)."),
    measurement: Optional[int] = typer.Option(None, "--measurement", help="Export a recorded measurement (JSON) instead."),
):
    """Export a session's steps (one row per step, named columns), its logbook report (Markdown) or a measurement (JSON)."""
    from controller import api

    if (session is None) == (measurement is None):
        raise ConfigError("export: give a session id or --measurement ID (one of them)")
    if measurement is not None:
        path = out or Path(f"measurement-{measurement}.json")
        path.write_text(json.dumps(api.measurement(measurement), indent=1))
    else:
        path = api.export(api.open_store(), session, fmt, out or Path(f"session-{session}.{fmt}"))
    console.print(f"written {path}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; beyond loopback an explicit token is required."),
    port: int = typer.Option(8765, "--port"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the operator token (or set TBSAC_OPERATOR_TOKEN)."),
    token: Optional[str] = typer.Option(None, "--token", hidden=True, help="Visible in `ps`: use --token-file or TBSAC_OPERATOR_TOKEN."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="Host names clients may use (Host header); loopback always."),
    machine_dir: list[Path] = typer.Option([], "--machine-dir", help="Folders whose machine files the API may open (besides the shipped ones)."),
    policy_dir: list[Path] = typer.Option([], "--policy-dir", help="Folders whose policy files the API may load (besides shipped and recorded ones)."),
    console_origin: list[str] = typer.Option([], "--console-origin", help="Origins (e.g. http://console-host:8501) of consoles "
                                             "on other hosts whose pages may read the live event stream; loopback always."),
    sim_step_interval: float = typer.Option(1.0, "--sim-step-interval", min=0.0, help="Least time per step of sessions on "
                                            "simulated machines, s (machine files set their own: min_step_interval_s)."),
):
    """The control server: owns machine connections; consoles come and go."""
    import secrets

    import uvicorn

    from controller.api import open_store
    from ui.server import create_app

    if token:
        _error("warning: --token is visible to every user in `ps`; use --token-file or TBSAC_OPERATOR_TOKEN")
    if token_file:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file: cannot read {token_file} ({exc})") from None
    token = token or os.environ.get("TBSAC_OPERATOR_TOKEN")
    if host not in LOOPBACK and not token:
        raise ConfigError(f"--host {host}: binding beyond loopback needs an explicit operator token "
                          "(--token-file or TBSAC_OPERATOR_TOKEN)")
    if not token:
        token = secrets.token_urlsafe(16)
        err_console.print(f"operator token: {token}", markup=False, highlight=False)
    # A control loop waking from network I/O gets the GIL back sooner (default 5 ms).
    sys.setswitchinterval(0.0005)
    hosts = [*LOOPBACK, *allowed_host] + ([host] if host not in ("0.0.0.0", "::") else [])
    app = create_app(open_store(), token, sim_step_interval=sim_step_interval, allowed_hosts=hosts,
                     machine_dirs=machine_dir, policy_dirs=policy_dir, console_origins=console_origin)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
        # One line, whatever the input it names contained.
        err_console.print(f"tbsac: error: {' '.join(str(exc).splitlines())}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
