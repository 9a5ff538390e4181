"""Bringing up a machine whose physics differs from the model: measure, calibrate, refuse.

Real softioc IOCs serving foreign machines (``tbsac ioc --foreign SEED``: hidden optics
drawn from a wide family, machine file the nominal one), real Channel Access, the
store in a real SQLite file.
"""

import json
import threading
import time

import epics
import numpy as np
import pytest
import yaml

from conftest import for_setup, policy_with_recorded_success
from controller.policy import Policy
from controller.session import run_session
from core.config import ConfigError
from hardware.epics_plant import EpicsPlant
from hardware.machine import load_machine
from safety.guard import InterlockRule, read_snapshot
from simulators.beamline.errors import load_error_model
from simulators.beamline.lattice import load_lattice
from simulators.beamline.model import BeamlineModel

MAX_STEP_A = 3.7


def hidden_response(ioc) -> np.ndarray:
    """The foreign IOC's true response (mm per machine-file unit), from its hidden errors."""
    lattice = load_lattice(ioc.lattice)
    errors = load_error_model(ioc.errors).draw(lattice, np.random.default_rng(ioc.seed), 1)
    return BeamlineModel(lattice).response(errors).r[0]


def setpoints(machine) -> np.ndarray:
    return np.array([epics.caget(c.setpoint, timeout=2) for c in machine.knobs])


def assert_steps_within_max_step(puts: list[dict], start: dict[str, float]):
    last = dict(start)
    for p in puts:
        assert abs(p["value"] - last[p["pv"]]) <= MAX_STEP_A + 1e-6, p
        assert abs(p["value"]) <= 37.0 + 1e-9, p
        last[p["pv"]] = p["value"]


@pytest.mark.slow  # 50 s; measure-response also runs by default (trip test, tests/controller/test_response.py)
def test_measure_response_restores_exactly_within_max_step_and_calibrate_fits_it(start_ioc, run_cli, tmp_path):
    ioc = start_ioc(seed=3, errors="foreign")
    path = ioc.machine_file()
    machine, _ = load_machine(path)
    before = setpoints(machine)
    proc = run_cli("measure-response", "--machine", str(path), "--samples", "2", "--sample-interval", "0.11", "--json",
                   timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "completed"
    np.testing.assert_allclose(setpoints(machine), before, atol=1e-9)  # restored exactly
    assert_steps_within_max_step(ioc.puts(), {c.setpoint: v for c, v in zip(machine.knobs, before)})
    # every write counted (each puts every knob), plus the verified restore at the end
    assert len(ioc.puts()) == len(machine.knobs) * (result["writes"] + 1)
    measured, sigma = np.array(result["matrix"]), np.array(result["sigma"])
    truth = hidden_response(ioc)
    assert np.median(np.abs(measured - truth) / sigma) < 2.0  # within the stated standard errors
    assert 0.03 < np.median(result["noise"]) < 0.08  # the IOC's BPM noise is 0.05 mm

    exported = tmp_path / "m.json"
    proc = run_cli("export", "--measurement", str(result["measurement"]), "--out", str(exported))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(exported.read_text())
    assert record["kind"] == "response" and record["data"]["matrix"] == result["matrix"] and record["operator"]

    out = tmp_path / "cal"
    proc = run_cli("calibrate", "--measurement", str(result["measurement"]), "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    hidden = load_error_model("foreign").draw(load_lattice("cafe2-cm1"), np.random.default_rng(3), 1)
    kick_error = np.abs(np.array(report["kick_scale"]) / hidden.corrector_scale[0] - 1)
    assert np.median(kick_error) < 0.05, kick_error
    assert np.all(np.sign(report["kick_scale"]) == np.sign(hidden.corrector_scale[0]))
    calibrated, calibrated_path = load_machine(out / "machine.yaml")  # a valid machine file, next to its lattice
    original = yaml.safe_load(path.read_text())["knobs"]
    # one calibrated unit = unit_scale nominal kicks; one declared unit was kick_scale of them
    for knob, was, k, u in zip(calibrated.knobs, original, report["kick_scale"], report["unit_scale"]):
        assert abs(knob.scale - was["scale"] * u / k) < 1e-9
    assert (out / "report.md").read_text().startswith("# Calibration") and (out / "response.png").stat().st_size > 0
    assert load_lattice(out / "lattice.yaml").derived_from == "cafe2-cm1"

    # The shipped policy on the calibrated machine goes through the knob map and corrects it.
    puts = len(ioc.puts())
    proc = run_cli("run", "--machine", str(out / "machine.yaml"), "--policy", "pretrained", "--mode", "auto", "--json",
                   timeout=240)
    assert proc.returncode == 0, proc.stderr
    session = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert session["success"] and session["final_rms_mm"] < 0.5 and not session["trips"], session
    assert "knob map" in proc.stdout + proc.stderr
    assert_steps_within_max_step(ioc.puts()[puts:], {c.setpoint: v for c, v in zip(machine.knobs, before)})


def test_measure_response_trip_restores(start_ioc, run_cli, tmp_path):
    ioc = start_ioc(seed=1)
    path = ioc.machine_file()
    machine, _ = load_machine(path)
    before = setpoints(machine)
    # Beam loss downstream once the probing has begun: the interlock trips, the start comes back.
    def lose_beam_after_first_probe():
        deadline = time.monotonic() + 120
        while len(ioc.puts()) < 2 * len(machine.knobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        epics.caput(ioc.pv("SIM:BEAM_LOSS"), 1, wait=True)

    threading.Thread(target=lose_beam_after_first_probe, daemon=True).start()
    proc = run_cli("measure-response", "--machine", str(path), "--samples", "2", "--sample-interval", "0.11", "--json",
                   timeout=240)
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "tripped" and "beam_current" in result["message"]
    assert any(e["kind"] == "restore" for e in result["events"])
    np.testing.assert_allclose(setpoints(machine), before, atol=1e-9)
    assert_steps_within_max_step(ioc.puts(), {c.setpoint: v for c, v in zip(machine.knobs, before)})


def _session(ioc, tmp_path, mode="auto", **kwargs):
    machine, path = load_machine(ioc.machine_file())
    plant = EpicsPlant(machine, path).connect()
    policy = Policy.load(kwargs.pop("policy", "pretrained"), *for_setup(load_lattice(ioc.lattice)))
    result = run_session(plant, policy, mode=mode, interlocks=[InterlockRule(i.name, i.rule, i.threshold) for i in machine.interlocks],
                         snapshot_path=tmp_path / f"snap-{mode}.json", **kwargs)
    return machine, result


def test_mismatch_guard_stops_a_foreign_machine_before_the_first_policy_step(start_ioc, tmp_path):
    ioc = start_ioc(seed=3, errors="foreign")
    machine, _ = load_machine(ioc.machine_file())
    before = setpoints(machine)
    machine, result = _session(ioc, tmp_path)
    assert result.status == "mismatch" and result.restored and not result.trips
    assert result.step_records == []  # no policy step
    mismatch = next(e for e in result.events if e.kind == "mismatch")
    assert "does not match the policy's lattice" in mismatch.reason and mismatch.data["mismatch"] > 0.35
    # The pilot, the opening probe (unless the pilot already showed the mismatch) and the restore, nothing else.
    assert len(ioc.puts()) in (2 * len(machine.knobs), 3 * len(machine.knobs))
    np.testing.assert_allclose(setpoints(machine), before, atol=1e-9)
    np.testing.assert_allclose(list(read_snapshot(tmp_path / "snap-auto.json")["channels"].values()), before, atol=1e-9)

    # Approve mode: the operator approves the probe; the mismatch still stops it.
    machine, result = _session(ioc, tmp_path, mode="approve", approver=lambda *_: True)
    assert result.status == "mismatch" and result.restored and result.step_records == []
    # Dry-run writes nothing: it compares a recorded measurement (here: the truth) instead.
    puts = len(ioc.puts())
    machine, result = _session(ioc, tmp_path, mode="dry-run", measured_response=hidden_response(ioc))
    assert result.status == "dry-run" and any(e.kind == "mismatch" for e in result.events)
    assert len(ioc.puts()) == puts


def test_the_pilot_stops_a_machine_that_would_lose_its_beam_to_the_opening_probe(start_ioc, tmp_path):
    """Foreign seed 9 kicks about 4x harder than the model: the full opening probe (+0.3
    units on every corrector) scrapes the whole beam off. The pilot (a quarter of it) shows
    the mismatch first; the session stops with the beam intact and the machine restored."""
    ioc = start_ioc(seed=9, errors="foreign")
    machine, _ = load_machine(ioc.machine_file())
    before = setpoints(machine)
    machine, result = _session(ioc, tmp_path)
    assert result.status == "mismatch" and result.restored and not result.trips, result.trips
    mismatch = next(e for e in result.events if e.kind == "mismatch")
    assert "pilot" in mismatch.data["source"] and mismatch.data["mismatch"] > mismatch.data["limit"]
    puts = ioc.puts()
    assert len(puts) == 2 * len(machine.knobs)  # the pilot and the restore
    pilot = 0.25 * 0.3 * 1.85  # A: a quarter of the 0.3-unit probe
    assert max(abs(p["value"] - b) for p, b in zip(puts, np.tile(before, 2))) <= pilot + 1e-6
    np.testing.assert_allclose(setpoints(machine), before, atol=1e-9)


def test_mismatch_guard_lets_a_matching_machine_run(start_ioc, tmp_path):
    ioc = start_ioc(seed=3)  # the test preset: the error model the policy was evaluated on
    _, result = _session(ioc, tmp_path)
    check = next(e for e in result.events if e.kind == "response_check")
    assert check.data["mismatch"] < 0.35
    assert result.status == "completed" and result.success


def test_fine_tuning_starts_from_the_policy_and_keeps_its_actor_while_the_critic_warms_up(run_cli, tmp_path):
    out = tmp_path / "ft"
    proc = run_cli("train", "orbit", "--lattice", "cafe2-cm1", "--init-from", "pretrained", "--steps", "1000",
                   "--eval-every", "1000", "--eval-episodes", "5", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 1000
    tuned = Policy.load(out / "policy.pt")
    shipped = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm1")))
    assert tuned.metadata["training"]["init_from"]["sha256"] == shipped.sha256
    for (name, a), b in zip(tuned.sac_policy.actor.state_dict().items(), shipped.sac_policy.actor.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name  # frozen for the first 3000 steps
    assert "response" in tuned.metadata  # the mismatch guard's model travels with the policy
    # ... and so does the evaluation that chose it, which an autonomous session checks
    evaluation = tuned.metadata["evaluation"]
    assert evaluation["summary"]["success_rate"] == record["curves"][-1]["success_rate"]
    assert evaluation["bar_met"] == (record["first_bar_step"] is not None)
    assert tuned.metadata["training"]["eval_episodes"] == 5


def test_a_policy_that_failed_its_own_evaluation_is_refused_in_auto_mode_before_any_write(start_ioc, run_cli, tmp_path):
    ioc = start_ioc(seed=3)
    failed = policy_with_recorded_success(tmp_path, 0.0)
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--policy", failed, "--mode", "auto", "--json",
                   env={"TBSAC_DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode == 2, proc.stderr
    assert "reached the target in 0%" in proc.stderr and "50 simulated machines" in proc.stderr and "--mode approve" in proc.stderr
    assert ioc.puts() == []  # nothing written, not even the opening probe
    with pytest.raises(ConfigError, match="below the 80%"):  # the library entry refuses too
        _session(ioc, tmp_path, policy=failed)
    assert ioc.puts() == []
    # A dry run may go on (it writes nothing) and says why auto would be refused.
    _, result = _session(ioc, tmp_path, mode="dry-run", policy=failed)
    assert result.status == "dry-run" and any("reached the target in 0%" in e.reason for e in result.events if e.kind == "warning")
    assert ioc.puts() == []
    # A policy whose own evaluation met the minimum runs as any other.
    _, result = _session(ioc, tmp_path, policy=policy_with_recorded_success(tmp_path, 0.9))
    assert result.status == "completed" and not any(e.kind == "warning" and "own evaluation" in e.reason for e in result.events)
