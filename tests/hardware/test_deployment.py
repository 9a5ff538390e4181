"""Deployment over real Channel Access: a softioc process, pyepics, the safety layer.

Every test starts its own virtual IOC (`tbsac ioc`) with a unique PV prefix on the
session's loopback port and reads the IOC's own log of the puts it received.
"""

import json
import signal
import subprocess
import time

import epics
import numpy as np
import pytest

from conftest import for_setup, tbsac_cmd
from controller.policy import Policy
from controller.session import run_session
from hardware.epics_plant import EpicsPlant
from hardware.machine import load_machine
from safety.guard import InterlockRule, SafetyConfig, read_snapshot
from simulators.beamline.lattice import load_lattice

LIMIT_A = 37.0


def connect(ioc, **overrides):
    machine, path = load_machine(ioc.machine_file(**overrides))
    return machine, EpicsPlant(machine, path).connect()


def session(ioc, plant, machine, tmp_path, **kwargs):
    policy = Policy.load("pretrained", *for_setup(load_lattice(ioc.lattice)))
    return run_session(
        plant, policy,
        interlocks=[InterlockRule(i.name, i.rule, i.threshold) for i in machine.interlocks],
        snapshot_path=tmp_path / "snapshot.json", **kwargs,
    )


def setpoints(ioc, machine):
    return np.array([epics.caget(c.setpoint, timeout=2) for c in machine.knobs])


def assert_puts_within_limits(ioc):
    puts = ioc.puts()
    assert all(abs(p["value"]) <= LIMIT_A + 1e-9 for p in puts), puts


def test_zero_shot_correction_over_channel_access(start_ioc, tmp_path):
    ioc = start_ioc(seed=3, ramp=0.05)
    machine, plant = connect(ioc)
    result = session(ioc, plant, machine, tmp_path)
    assert result.status == "completed" and result.success
    assert result.initial > 0.5 and result.final < 0.5
    assert result.trips == [] and not result.restored
    # Every step wrote all 10 correctors once (plus the reset probe); nothing else.
    assert len(ioc.puts()) == 10 * (result.steps + 2)  # the mismatch pilot, the opening probe, every step
    assert_puts_within_limits(ioc)
    snap = read_snapshot(tmp_path / "snapshot.json")
    assert set(snap["knobs"]) == set(load_lattice("cafe2-cm1").corrector_names)


def test_polarity_and_scale_reach_the_ioc(start_ioc):
    ioc = start_ioc(seed=1)
    machine, plant = connect(ioc)
    settings = np.linspace(-2, 2, 10)
    plant.write_knobs(settings)
    np.testing.assert_allclose(setpoints(ioc, machine), settings * np.array([c.scale for c in machine.knobs]), atol=1e-6)
    np.testing.assert_allclose(plant.read_knobs(), settings, atol=1e-6)


def test_action_beyond_limits_is_clamped_before_epics(start_ioc, tmp_path):
    from safety.guard import GuardedPlant

    ioc = start_ioc(seed=2)
    machine, plant = connect(ioc, max_step=1000.0)
    guard = GuardedPlant(plant, SafetyConfig(max_excursion=100.0), snapshot_path=tmp_path / "s.json")
    guard.begin()
    guard.write_knobs(np.full(10, 50.0))  # 50 units = 92.5 A, beyond the 37 A limit
    assert_puts_within_limits(ioc)
    assert max(abs(p["value"]) for p in ioc.puts()) == pytest.approx(LIMIT_A)
    clamps = [e for e in guard.events if e.kind == "clamp"]
    assert clamps and "hard limit" in clamps[0].reason


def test_per_step_and_excursion_limits_are_recorded(start_ioc, tmp_path):
    from safety.guard import GuardedPlant

    ioc = start_ioc(seed=2)
    machine, plant = connect(ioc)
    guard = GuardedPlant(plant, SafetyConfig(max_excursion=3.0), snapshot_path=tmp_path / "s.json")
    guard.begin()
    guard.write_knobs(np.full(10, 5.0))  # max_step is 3.7 A = 2 units
    assert np.allclose(plant.read_knobs(), 2.0, atol=1e-6)
    guard.write_knobs(np.full(10, 5.0))  # excursion 3 units from the start
    assert np.allclose(plant.read_knobs(), 3.0, atol=1e-6)
    reasons = " ".join(e.reason for e in guard.events if e.kind == "clamp")
    assert "per-step change limit" in reasons and "total excursion limit" in reasons


@pytest.mark.parametrize("fault, needle", [(1, "not a number"), (2, "saturated"), (3, "INVALID")])
def test_bad_bpm_trips_and_restores(start_ioc, tmp_path, fault, needle):
    ioc = start_ioc(seed=4)
    machine, plant = connect(ioc)
    start = setpoints(ioc, machine)

    def inject(record):
        if record.step == 1:
            epics.caput(ioc.pv("SIM:READING_FAULT"), fault, wait=True)

    result = session(ioc, plant, machine, tmp_path, on_step=inject)
    assert result.status == "tripped" and not result.success
    assert any(needle in t for t in result.trips), result.trips
    assert result.restored
    np.testing.assert_allclose(setpoints(ioc, machine), start, atol=1e-9)  # verified by us, too
    assert ioc.puts()[-10:] == [p for p in ioc.puts()[-10:] if p["value"] == 0.0]


def test_stale_bpm_data_trips_and_restores(start_ioc, tmp_path):
    ioc = start_ioc(seed=4)
    machine, plant = connect(ioc)
    plant.machine = machine.model_copy(update={"stale_after_s": 0.5})

    def freeze(record):
        if record.step == 1:
            epics.caput(ioc.pv("SIM:READING_FAULT"), 4, wait=True)
            time.sleep(0.8)  # longer than stale_after_s: BPM1:X stops updating

    result = session(ioc, plant, machine, tmp_path, on_step=freeze)
    assert result.status == "tripped" and result.restored
    assert any("BPM1:x stale" in t for t in result.trips), result.trips
    np.testing.assert_allclose(setpoints(ioc, machine), 0.0, atol=1e-9)


def test_beam_loss_trips_and_restores(start_ioc, tmp_path):
    ioc = start_ioc(seed=5)
    machine, plant = connect(ioc)

    def inject(record):
        if record.step == 1:
            epics.caput(ioc.pv("SIM:BEAM_LOSS"), 1, wait=True)

    result = session(ioc, plant, machine, tmp_path, on_step=inject)
    assert result.status == "tripped" and result.restored
    assert any("beam loss" in t for t in result.trips), result.trips
    np.testing.assert_allclose(setpoints(ioc, machine), 0.0, atol=1e-9)


def test_silent_clamp_by_the_ioc_is_caught_by_read_back(start_ioc, tmp_path):
    ioc = start_ioc(seed=6)
    machine, plant = connect(ioc)
    # Someone narrows the drive limit of DCH1 on the IOC after we connected: the IOC
    # clamps our next put silently and still reports success.
    epics.caput(machine.knobs[0].setpoint + ".DRVH", 0.1, wait=True)
    epics.caput(machine.knobs[0].setpoint + ".DRVL", -0.1, wait=True)
    result = session(ioc, plant, machine, tmp_path)
    assert result.status == "tripped"
    assert any("read-back mismatch" in t and "DCH1" in t for t in result.trips), result.trips
    assert result.restored


def test_dry_run_never_writes(start_ioc, tmp_path):
    ioc = start_ioc(seed=7)
    machine, plant = connect(ioc)
    result = session(ioc, plant, machine, tmp_path, mode="dry-run")
    assert result.status == "dry-run"
    assert [e.kind for e in result.events].count("proposal") >= 1
    time.sleep(0.2)
    assert ioc.puts() == []


def test_approve_mode_writes_only_after_confirmation(start_ioc, tmp_path):
    ioc = start_ioc(seed=8)
    machine, plant = connect(ioc)
    seen = []

    def approver(current, proposed, names):
        seen.append(len(ioc.puts()))
        return True

    result = session(ioc, plant, machine, tmp_path, mode="approve", approver=approver)
    assert result.success
    # At each proposal the IOC had received exactly the previously approved steps.
    assert seen == [10 * k for k in range(len(seen))]
    assert len(ioc.puts()) == 10 * len(seen)


def test_approve_mode_reject_writes_nothing_and_restores(start_ioc, tmp_path):
    ioc = start_ioc(seed=8)
    machine, plant = connect(ioc)
    answers = iter([True, False])
    result = session(ioc, plant, machine, tmp_path, mode="approve", approver=lambda *a: next(answers))
    assert result.status == "rejected" and result.restored
    puts = ioc.puts()
    assert len(puts) == 20  # the approved probe, then the restore; the rejected step never
    assert all(p["value"] == 0.0 for p in puts[10:])


def test_operator_abort_restores(start_ioc, tmp_path):
    ioc = start_ioc(seed=9)
    machine, plant = connect(ioc)
    guards = []

    def abort_after_first(record):
        guards[0].abort("operator pressed abort")

    result = session(ioc, plant, machine, tmp_path, on_step=abort_after_first, guard_ready=guards.append)
    assert result.status == "aborted" and result.trips == ["operator pressed abort"]
    assert result.restored
    np.testing.assert_allclose(setpoints(ioc, machine), 0.0, atol=1e-9)


def test_missing_pv_refuses_to_start_and_names_it(start_ioc, tmp_path, run_cli):
    ioc = start_ioc(seed=1)
    path = ioc.machine_file()
    path.write_text(path.read_text().replace(ioc.pv("BPM3:X"), ioc.pv("BPM3:XX")))
    proc = run_cli("run", "--machine", str(path), "--json", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert ioc.pv("BPM3:XX") in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert ioc.puts() == []


def test_limits_wider_than_drive_limits_are_refused(start_ioc, run_cli):
    ioc = start_ioc(seed=1)
    path = ioc.machine_file(upper=80.0)
    proc = run_cli("run", "--machine", str(path), "--json", timeout=60)
    assert proc.returncode == 2
    assert "knobs[0](DCH1).upper" in proc.stderr and "drive limits" in proc.stderr
    assert ioc.puts() == []


def test_machine_file_missing_field(tmp_path, run_cli):
    from hardware.machine import MACHINE_DIR

    text = (MACHINE_DIR / "virtual-cafe2-cm1.yaml").read_text().replace("tolerance: 0.01, ", "", 1)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    proc = run_cli("run", "--machine", str(path))
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "knobs[0](DCH1).tolerance" in proc.stderr and "required" in proc.stderr


def _run_in_background(ioc, tmp_path, *extra):
    snap = tmp_path / "snap.json"
    proc = subprocess.Popen(
        [*tbsac_cmd(), "run", "--machine", str(ioc.machine_file(settle_timeout_s=2.0)), "--json", "--snapshot", str(snap), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while len(ioc.puts()) < 15 and time.monotonic() < deadline:  # mid-way through step 1
        time.sleep(0.02)
    assert len(ioc.puts()) >= 15, "session did not start"
    return proc, snap


@pytest.mark.parametrize("how", ["kill", pytest.param("freeze", marks=pytest.mark.slow)])  # one default, both in CI
def test_ioc_lost_mid_session_stops_keeps_snapshot_and_restore_works(start_ioc, tmp_path, run_cli, how):
    ioc = start_ioc(seed=10, ramp=0.5)
    proc, snap = _run_in_background(ioc, tmp_path)
    lost_at = time.monotonic()
    ioc.kill(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    out, err = proc.communicate(timeout=30)
    stopped_after = time.monotonic() - lost_at
    assert proc.returncode == 3, err
    assert stopped_after <= 2 * 2.0 + 3.0  # 2 x the settle timeout, plus process exit
    result = json.loads(out)
    assert not result["restored"] and result["snapshot"] == str(snap)
    assert "connection lost" in err or "did not complete" in err or "no answer" in err
    assert snap.exists()
    n_puts = len(ioc.puts())
    if how == "kill":
        ioc.proc.wait()
        ioc.start()  # same seed and prefix: the machine is back, with setpoints at zero
        epics_before = None
    else:
        ioc.kill(signal.SIGCONT)
        time.sleep(1.0)
        # Puts already in flight when it froze may land now; nothing new is sent.
        assert len(ioc.puts()) - n_puts <= 10
        epics_before = len(ioc.puts())
    restored = run_cli("restore", str(snap), timeout=60)
    assert restored.returncode == 0, restored.stderr
    assert "verified" in restored.stdout
    if epics_before is not None:
        assert len(ioc.puts()) == epics_before + 10
    machine, _ = load_machine(ioc.machine_file())
    np.testing.assert_allclose(setpoints(ioc, machine), 0.0, atol=1e-9)


def test_run_cli_json_and_exit_code(start_ioc, tmp_path, run_cli):
    ioc = start_ioc(seed=11)
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--policy", "pretrained", "--mode", "auto",
                   "--json", "--snapshot", str(tmp_path / "s.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"task", "metric", "initial_rms_mm", "final_rms_mm", "steps", "wall_s", "success", "trips", "restored", "snapshot"}
    assert out["success"] and out["final_rms_mm"] < 0.5 and out["trips"] == []


def test_policy_for_other_lattice_is_refused(start_ioc, run_cli):
    ioc = start_ioc(seed=1)
    cm2 = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm2"))).path
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--policy", str(cm2), timeout=60)
    assert proc.returncode == 2 and "metadata.lattice.n_bpm" in proc.stderr
    assert ioc.puts() == []


def test_unknown_mode(run_cli):
    proc = run_cli("run", "--machine", "virtual-cafe2-cm1", "--mode", "yolo")
    assert proc.returncode == 2 and "--mode" in proc.stderr
