"""RFQ transmission tuning deployed over real Channel Access (`tbsac ioc --lattice lpi`).

The pretrained lpi agent drives the virtual injector's supplies through the safety
layer; a transmission collapse (the IOC's beam-loss fault inside the RFQ) must trip the
session and restore the starting settings, verified on the IOC.
"""

import json

import epics
import numpy as np
import pytest
import yaml

from controller.policy import Policy
from controller.session import run_session
from controller.machines import machine_setup, open_machine
from hardware.machine import load_machine
from safety.guard import InterlockRule, read_snapshot
from core.config import ConfigError
from simulators.injector.model import load_injector
from simulators.injector.task import InjectorSimPlant, load_injector_errors
from conftest import for_setup


@pytest.fixture(scope="module")
def agent():
    return Policy.load("pretrained", *for_setup(load_injector("lpi")))


def connect(ioc):
    opened = open_machine(str(ioc.machine_file()))
    return opened.machine_file, opened.plant


def rules(machine):
    return [InterlockRule(i.name, i.rule, i.threshold) for i in machine.interlocks]


def setpoints(machine):
    return np.array([epics.caget(c.setpoint, timeout=2) for c in machine.knobs])


def test_zero_shot_tuning_over_channel_access(start_ioc, tmp_path, agent):
    ioc = start_ioc(lattice="lpi", seed=2, ramp=0.02)
    machine, plant = connect(ioc)
    start = setpoints(machine)
    result = run_session(plant, agent, interlocks=rules(machine), snapshot_path=tmp_path / "snap.json")
    assert result.task == "rfq" and result.trips == []
    walks = [e for e in result.events if e.kind == "return_to_best"]
    assert result.steps == 30 or walks  # the budget is used unless it ended on its best setting early
    if walks:
        target = np.array(walks[0].data["target"])
        np.testing.assert_allclose(result.step_records[-1].readbacks, target, atol=1e-3)
    assert result.final > result.initial
    # Every step wrote the six supplies once, within the machine file's limits and steps.
    puts = ioc.puts()
    assert len(puts) == 6 * result.steps + (6 if result.restored else 0)
    for c in machine.knobs:
        values = [p["value"] for p in puts if p["pv"] == c.setpoint]
        assert all(c.lower - 1e-9 <= v <= c.upper + 1e-9 for v in values)
        path = np.concatenate([[start[machine.knobs.index(c)]], values[:result.steps]])
        assert np.all(np.abs(np.diff(path)) <= c.max_step + 1e-6)
    snap = read_snapshot(tmp_path / "snap.json")
    assert list(snap["knobs"]) == load_injector("lpi").knob_names
    assert result.step_records[-1].metrics["transmission"] == pytest.approx(result.final)
    assert not [e for e in result.events if e.kind == "warning"]  # the machine file steps as trained


def test_transmission_collapse_trips_and_restores(start_ioc, tmp_path, agent):
    ioc = start_ioc(lattice="lpi", seed=4)
    machine, plant = connect(ioc)
    start = setpoints(machine)

    def collapse(record):
        if record.step == 2:
            epics.caput(ioc.pv("SIM:BEAM_LOSS"), 1, wait=True)

    result = run_session(plant, agent, interlocks=rules(machine), snapshot_path=tmp_path / "snap.json", on_step=collapse)
    assert result.status == "tripped" and result.restored
    assert any("transmission" in t and "fell below 50%" in t for t in result.trips), result.trips
    np.testing.assert_allclose(setpoints(machine), start, atol=1e-9)
    assert result.steps <= 4


def test_excursion_limit_counts_each_knobs_own_steps(start_ioc, tmp_path, agent):
    from safety.guard import SafetyConfig

    ioc = start_ioc(lattice="lpi", seed=2)
    machine, plant = connect(ioc)
    start = setpoints(machine)
    result = run_session(plant, agent, safety=SafetyConfig(max_excursion_steps=1.0), interlocks=rules(machine),
                         snapshot_path=tmp_path / "snap.json")
    steps_a = np.array([c.max_step for c in machine.knobs])
    for p in ioc.puts():
        i = [c.setpoint for c in machine.knobs].index(p["pv"])
        assert abs(p["value"] - start[i]) <= steps_a[i] + 1e-6
    assert any(e.kind == "clamp" and "excursion" in e.reason for e in result.events)


@pytest.mark.slow  # 15 s; `tbsac run` is covered by the orbit CLI tests, the injector by test_zero_shot_tuning
def test_run_cli_on_the_injector(start_ioc, tmp_path, run_cli):
    ioc = start_ioc(lattice="lpi", seed=6, ramp=0.0)
    store = {"TBSAC_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite'}"}
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--json", "--snapshot", str(tmp_path / "s.json"),
                   timeout=180, env=store)
    assert proc.returncode in (0, 3), proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"initial_transmission", "final_transmission", "steps", "trips", "restored"}
    assert out["trips"] == []
    # The recorded session replays: every step reproduced, the transmission per step shown.
    proc = run_cli("replay", "1", env=store, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "transmission" in proc.stdout and f"{out['steps']} of {out['steps']} actions reproduced" in proc.stdout



@pytest.mark.slow  # 9 s; a warning path, checked in CI
def test_run_cli_warns_when_the_machine_steps_smaller_than_training(start_ioc, run_cli):
    ioc = start_ioc(lattice="lpi", seed=6, ramp=0.0)
    proc = run_cli("run", "--machine", str(ioc.machine_file(max_step=0.5)), "--mode", "dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "warning: machine's largest step below the policy's training step" in proc.stderr
    assert "SOL1" in proc.stderr and "ST2:V" in proc.stderr
    assert ioc.puts() == []  # dry-run writes nothing

def test_orbit_policy_is_refused_on_the_injector(start_ioc, run_cli):
    ioc = start_ioc(lattice="lpi", seed=1)
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--policy", "controller/policies/cafe2-cm1.pt", timeout=60)
    assert proc.returncode == 2 and "metadata.task" in proc.stderr and "'orbit'" in proc.stderr
    assert ioc.puts() == []


def test_rfq_policy_is_refused_on_a_cryomodule(run_cli):
    from controller.policy import POLICY_DIR

    proc = run_cli("evaluate", "orbit", "--policy", str(POLICY_DIR / "lpi.pt"), "--episodes", "1")
    assert proc.returncode == 2 and "metadata.task" in proc.stderr


def test_rfq_machine_file_must_have_monitors(tmp_path):
    from hardware.machine import MACHINE_DIR

    data = yaml.safe_load((MACHINE_DIR / "virtual-lpi.yaml").read_text())
    data["monitors"] = []
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="monitors"):
        load_machine(path)
    data = yaml.safe_load((MACHINE_DIR / "virtual-lpi.yaml").read_text())
    data["monitors"][0]["name"] = "BCT"
    path.write_text(yaml.safe_dump(data))
    machine, p = load_machine(path)
    with pytest.raises(ConfigError, match="monitors"):
        machine_setup(machine, p)


def test_simulated_injector_session_through_the_guard(agent):
    plant = InjectorSimPlant(load_injector("lpi"), load_injector_errors("test"))
    plant.reset(11)
    start = plant.read_knobs()
    result = run_session(plant, agent, interlocks=[InterlockRule("transmission", "min_fraction_of_start", 0.5)])
    assert result.trips == [] and result.steps <= 30
    # Deterministic simulator: this injector ends with a walk back to the best measured setting.
    walk = next(e for e in result.events if e.kind == "return_to_best")
    np.testing.assert_allclose(plant.read_knobs(), walk.data["target"])
    assert walk.data["best_transmission"] >= result.step_records[walk.data["from_step"] - 2].metrics["transmission"] + 0.01
    if result.restored:
        np.testing.assert_allclose(plant.read_knobs(), start)
        assert result.final <= result.initial
    else:
        assert result.final > result.initial


class _Scripted:
    """A stand-in policy with the shipped metadata that always pushes SOL2 up (detunes the match)."""

    def __init__(self, agent, **task_config):
        self.metadata = {**agent.metadata, "task_config": {**agent.metadata.get("task_config", {}), **task_config}}
        self.task = agent.task

    def act(self, obs):
        return np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])


def test_session_ending_below_its_start_restores_the_start(agent):
    plant = InjectorSimPlant(load_injector("lpi"), load_injector_errors("test"))
    plant.reset(5)
    start = plant.read_knobs()
    # No interlocks and no walk back to the best setting: the end-of-session rule must act.
    result = run_session(plant, _Scripted(agent, return_margin=1.0))
    assert result.status == "not_converged" and result.steps == 30
    assert result.final < result.initial
    assert result.restored and any(e.kind == "stop" and "not above the start" in e.reason for e in result.events)
    np.testing.assert_allclose(plant.read_knobs(), start)
    # The excursion limit (15 of SOL2's own steps) held while it pushed.
    assert max(r.safe[3] for r in result.step_records) == pytest.approx(start[3] + 15 * load_injector("lpi").knob_steps[3])



def test_session_walks_back_to_its_best_measured_setting(agent):
    """Pushing SOL2 away from a good start: halfway through the budget the session walks back to it."""
    lattice = load_injector("lpi")
    plant = InjectorSimPlant(lattice, load_injector_errors("test"))
    plant.reset(3)  # pushing SOL2 up only loses transmission here
    start = plant.read_knobs()
    events = []
    result = run_session(plant, _Scripted(agent), on_event=events.append)
    walk = [e for e in result.events if e.kind == "return_to_best"]
    assert len(walk) == 1 and walk[0] in events
    # The start read best; after 14 pushes away, 16 writes remain: 14 to come back and one to spare
    # (a supply reading back short of its setpoint shortens a step), so it arrives at step 28.
    assert walk[0].data["from_step"] == 15 and walk[0].data["best_step"] == 0
    np.testing.assert_allclose(walk[0].data["target"], start)
    sol2 = [start[3]] + [r.safe[3] for r in result.step_records]
    assert np.allclose(np.diff(sol2), [lattice.knob_steps[3]] * 14 + [-lattice.knob_steps[3]] * 14)
    np.testing.assert_allclose([r.action[3] for r in result.step_records[14:]], [-1.0] * 14)
    np.testing.assert_allclose(plant.read_knobs(), start, atol=1e-12)
    assert result.steps == 28 and result.trips == []
    assert abs(result.final - result.initial) < 0.02  # same settings, another reading

def test_shipped_machine_file_steps_as_the_agent_was_trained():
    """The guard clips each step to the machine file's largest step: it must not cut the agent's training step."""
    from hardware.machine import MACHINE_DIR

    machine, _ = load_machine(MACHINE_DIR / "virtual-lpi.yaml")
    lattice = load_injector("lpi")
    assert [c.name for c in machine.knobs] == lattice.knob_names
    np.testing.assert_allclose([c.max_step / abs(c.scale) for c in machine.knobs], lattice.knob_steps)


def test_machine_stepping_smaller_than_training_is_logged_and_clipped(agent):
    """A machine file that allows smaller steps than the policy learned with: safe, but the operator is told."""
    import dataclasses

    plant = InjectorSimPlant(load_injector("lpi"), load_injector_errors("test"))
    plant.reset(11)
    plant.knobs = [dataclasses.replace(k, max_step=k.max_step / 2) if k.name.startswith("ST1") else k for k in plant.knobs]
    events = []
    result = run_session(plant, agent, interlocks=[InterlockRule("transmission", "min_fraction_of_start", 0.5)],
                         on_event=events.append)
    warnings = [e for e in result.events if e.kind == "warning"]
    assert len(warnings) == 1 and warnings[0] in events  # stored like every other event
    assert warnings[0].data["knobs"] == ["ST1:H", "ST1:V"] and "clipped" in warnings[0].reason
    limit = plant.knobs[2].max_step
    assert any(e.kind == "clamp" for e in result.events)
    settings = [result.step_records[0].safe] + [r.safe for r in result.step_records]
    assert max(abs(b[2] - a[2]) for a, b in zip(settings, settings[1:])) <= limit + 1e-9
