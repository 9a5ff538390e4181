"""The task seam, proved by a toy plant defined entirely under tests/ (tests/toy/thermal.py).

Registered through the environment (``TBSAC_TASKS``), the oven is trained, evaluated,
served by the virtual IOC, run with ``tbsac run`` in auto, approve and dry-run modes
through the safety layer (and tripped by its interlock), recorded, replayed and shown
by the console, with no line of it in controller/, safety/, hardware/ or ui/.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import epics
import numpy as np
import pytest
import yaml

from conftest import tbsac_cmd

TESTS = Path(__file__).resolve().parent
ROOMS = [TESTS.parent / room for room in ("controller", "safety", "hardware", "ui")]
# The toy's own folder goes on the path (not tests/, whose hardware/ etc. would shadow the rooms).
TOY_PATH = TESTS / "toy"
TOY = "thermal=thermal:ThermalDefinition"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Environment of every toy command (the task registered, its own store) and a trained policy."""
    tmp = tmp_path_factory.mktemp("toy")
    env = {"TBSAC_TASKS": TOY, "PYTHONPATH": os.pathsep.join(filter(None, [str(TOY_PATH), os.environ.get("PYTHONPATH")])),
           "TBSAC_DATABASE_URL": f"sqlite:///{tmp / 'toy.sqlite'}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process too (the IOC fixture and in-process checks)
    sys.path.insert(0, str(TOY_PATH))

    def cli(*args, timeout=300, stdin=None):
        return subprocess.run([*tbsac_cmd(), *args], capture_output=True, text=True, timeout=timeout, input=stdin,
                              env={**os.environ, **env})

    out = tmp / "run"
    proc = cli("train", "thermal", "--steps", "1000", "--seed", "1", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    yield {"cli": cli, "tmp": tmp, "policy": out / "policy.pt", "db": env["TBSAC_DATABASE_URL"], "train_out": out}
    sys.path.remove(str(TOY_PATH))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sessions(toy):
    from controller.store import SessionRow, Store

    store = Store(toy["db"])
    rows = store.list(SessionRow)
    store.engine.dispose()
    return rows


def test_no_line_of_the_toy_in_the_generic_rooms():
    for room in ROOMS:
        for path in room.rglob("*.py"):
            text = path.read_text().lower()
            assert "thermal" not in text and "oven" not in text, path


def test_registered_trained_and_evaluated(toy):
    info = toy["cli"]("info")
    assert info.returncode == 0 and "thermal" in info.stdout and "oven" in info.stdout
    record = json.loads((toy["train_out"] / "training.json").read_text())
    assert record["task"] == "thermal" and [c["step"] for c in record["curves"]] == [500, 1000]
    assert {"success_rate", "final_error_c", "steps"} <= set(record["curves"][-1])
    proc = toy["cli"]("evaluate", "thermal", "--policy", str(toy["policy"]), "--episodes", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert set(summary["results"]) == {"agent", "proportional"}
    assert summary["results"]["proportional"]["success_rate"] == 1.0  # the baseline knows the nominal gain
    wrong = toy["cli"]("evaluate", "orbit", "--policy", str(toy["policy"]), "--episodes", "1", "--json")
    assert wrong.returncode == 2 and "policy is for task 'thermal'" in wrong.stderr


@pytest.fixture
def oven(toy, start_ioc, tmp_path):
    """The oven's virtual IOC and a machine file for it."""
    ioc = start_ioc(lattice="oven", seed=4, ramp=0.0)
    machine = {
        "name": "toy-oven", "task": "thermal", "lattice": "oven", "stale_after_s": 2.0,
        "knobs": [{"name": "heater", "setpoint": ioc.pv("heater:I_SET"), "readback": ioc.pv("heater:I_RB"), "scale": 1.0,
                   "unit": "W", "lower": 0.0, "upper": 100.0, "max_step": 10.0, "tolerance": 0.01, "settle_timeout_s": 5}],
        "monitors": [{"name": "temperature", "pv": ioc.pv("TEMPERATURE"), "unit": "degC", "lower": -50.0, "upper": 150.0}],
        "interlocks": [{"name": "case_temperature", "pv": ioc.pv("CASE_TEMPERATURE"), "rule": "max", "threshold": 120.0}],
    }
    path = tmp_path / "toy-oven.yaml"
    path.write_text(yaml.safe_dump(machine, sort_keys=False))
    return ioc, path


def check_puts(ioc, restored: bool = False) -> list[float]:
    """Every put the IOC received was within the limits and one largest step from the last
    (the way to the safe state is ramped like any other write)."""
    values = [p["value"] for p in ioc.puts()]
    path = [0.0] + values
    assert all(0.0 <= v <= 100.0 for v in values)
    assert all(abs(b - a) <= 10.0 + 1e-6 for a, b in zip(path, path[1:]))
    return values


def replayed(toy, session_id: int) -> dict:
    proc = toy["cli"]("replay", str(session_id), "--json")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return json.loads(proc.stdout)


@pytest.mark.parametrize("mode", ["auto", pytest.param("approve", marks=pytest.mark.slow),
                                  pytest.param("dry-run", marks=pytest.mark.slow)])
def test_run_on_the_virtual_oven_through_the_safety_layer(toy, oven, mode):
    ioc, machine = oven
    proc = toy["cli"]("run", "--machine", str(machine), "--policy", str(toy["policy"]), "--mode", mode, "--json",
                      "--operator", "tester", timeout=120, stdin="y\n" * 40)
    session = sessions(toy)[-1]
    assert session.task == "thermal" and session.mode == mode
    assert session.layout["knobs"] == [{"name": "heater", "unit": "W", "lower": 0.0, "upper": 100.0,
                                        "engineering": {"unit": "W", "scale": 1.0}}]  # as its machine file wires it
    assert session.layout["readings"] == [{"name": "temperature", "unit": "degC"}]
    assert proc.returncode in (0, 3), proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "thermal" and out["metric"] == "error_c"
    puts = check_puts(ioc, restored=out["restored"])
    if mode == "dry-run":
        assert puts == [] and session.status == "dry-run"
    else:
        assert puts and session.status in ("completed", "not_converged")
        if session.status == "not_converged":  # the start is the oven's safe state: restored, verified
            assert puts[-1] == 0.0 and out["restored"]
    report = replayed(toy, session.id)
    assert report["steps"] == out["steps"] >= 1 and report["reproduced_fraction"] == 1.0
    assert all("error_c" in r["metrics"] for r in report["table"])
    csv_path = toy["tmp"] / f"s{session.id}.csv"
    assert toy["cli"]("export", str(session.id), "--out", str(csv_path)).returncode == 0
    assert "reading:temperature (degC)" in csv_path.read_text().splitlines()[0]


def test_critics_with_privileged_features_are_refused_for_a_task_that_has_none(toy, tmp_path):
    from controller.training import train
    from core.config import ConfigError
    from core.registry import get_task

    definition = get_task("thermal")
    with pytest.raises(ConfigError, match="privileged_critic: task thermal has no privileged features"):
        train(definition, definition.load_setup("oven"), definition.load_errors("train"), 100, 0, tmp_path,
              sac_overrides={"privileged_critic": True}, progress=False)


def test_action_repeat_holds_one_action_for_several_task_steps_and_sums_their_rewards(toy):
    from core.config import ConfigError
    from core.registry import get_task
    from core.task import TaskEnv

    definition = get_task("thermal")
    setup, errors = definition.load_setup("oven"), definition.load_errors("train")

    def env(repeat: int) -> TaskEnv:
        plant = definition.sim_plant(setup, errors)
        return TaskEnv(plant, definition.make_task(setup, plant.knobs, plant.readings, definition.config_model()()),
                       action_repeat=repeat)

    held, single = env(3), env(1)
    held.reset(seed=7)
    single.reset(seed=7)
    action = np.array([0.4], dtype=np.float32)
    obs, reward, terminated, *_ = held.step(action)
    steps = [single.step(action) for _ in range(3)]
    assert not terminated and not any(step[2] for step in steps)  # three whole steps ran in both
    assert held.task.steps == single.task.steps == 3
    assert reward == pytest.approx(sum(step[1] for step in steps)) and reward != pytest.approx(steps[0][1])
    np.testing.assert_array_equal(obs, steps[-1][0])
    # An episode's end stops the repeat: a held action never runs past it.
    long = env(10_000)
    long.reset(seed=7)
    *_, terminated, truncated, _ = long.step(action)
    assert (terminated or truncated) and long.task.steps <= long.task.max_steps
    with pytest.raises(ConfigError, match="action_repeat must be >= 1"):
        env(0)


def test_a_paired_reference_is_refused_for_a_task_without_a_reference_policy(toy, tmp_path):
    from controller.training import train
    from core.config import ConfigError
    from core.registry import get_task

    definition = get_task("thermal")
    with pytest.raises(ConfigError, match="paired_reference: task .* has no reference policy"):
        train(definition, definition.load_setup("oven"), definition.load_errors("train"), 100, 0, tmp_path,
              sac_overrides={"paired_reference": True}, progress=False)


def test_training_can_keep_its_last_checkpoint_and_take_its_evaluation_interval_from_the_overrides(toy, tmp_path):
    """A task whose evaluation cannot tell its checkpoints apart keeps the last one; a task
    config that makes one environment step longer (a whole season) sets its own interval."""
    from controller import api
    from controller.policy import Policy
    from core.registry import get_task

    definition = get_task("thermal")
    result = api.train("thermal", "oven", "train", None, 600, 3, tmp_path, eval_episodes=3, progress=False,
                       sac_overrides={"keep_last": True, "eval_every": 200})
    assert [c["step"] for c in result.curves] == [200, 400, 600]  # the toy's own interval is 500
    kept = Policy.load(tmp_path / "policy.pt", definition, definition.load_setup("oven"))
    assert kept.metadata["training"]["checkpoint_step"] == 600 and result.best_step == 600


def test_a_time_budget_stops_training_between_evaluations_with_a_checkpoint(toy, tmp_path):
    """--max-minutes is kept even when the next evaluation is far off: the run evaluates
    where the budget ends, keeps that checkpoint and stops."""
    from controller import api
    from controller.policy import Policy
    from core.registry import get_task

    definition = get_task("thermal")
    result = api.train("thermal", "oven", "train", None, 200_000, 3, tmp_path, eval_every=100_000, eval_episodes=3,
                       progress=False, max_minutes=0.05)
    assert len(result.curves) == 1 and 0 < result.curves[0]["step"] < 100_000
    kept = Policy.load(tmp_path / "policy.pt", definition, definition.load_setup("oven"))
    assert kept.metadata["training"]["checkpoint_step"] == result.curves[0]["step"] == result.best_step
    assert json.loads((tmp_path / "training.json").read_text())["curves"] == result.curves


def test_training_with_a_repeated_action_records_it_and_refuses_zero(toy):
    out = toy["tmp"] / "repeat"
    proc = toy["cli"]("train", "thermal", "--steps", "1000", "--eval-every", "1000", "--action-repeat", "2",
                      "--seed", "2", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    from controller.policy import Policy
    from core.registry import get_task

    definition = get_task("thermal")
    policy = Policy.load(out / "policy.pt", definition, definition.load_setup("oven"))
    assert policy.metadata["training"]["sac_overrides"]["action_repeat"] == 2
    record = json.loads((out / "training.json").read_text())
    assert [c["step"] for c in record["curves"]] == [1000]
    bad = toy["cli"]("train", "thermal", "--steps", "1000", "--action-repeat", "0", "--out", str(out / "bad"))
    assert bad.returncode == 2 and "--action-repeat" in bad.stderr


def test_the_toy_interlock_trips_and_restores(toy, oven):
    ioc, machine = oven
    epics.caput(ioc.pv("SIM:DOOR_OPEN"), 1, wait=True)  # the case runs 80 K hotter than the oven
    proc = toy["cli"]("run", "--machine", str(machine), "--policy", str(toy["policy"]), "--json", timeout=120)
    out = json.loads(proc.stdout)
    if not out["steps"]:
        pytest.skip("the policy did not heat at all")  # nothing to trip on
    assert proc.returncode == 3 and sessions(toy)[-1].status == "tripped"
    assert any("case_temperature" in t for t in out["trips"]) and out["restored"]
    assert check_puts(ioc, restored=True)[-1] == 0.0  # the heater is back off, verified by read-back


def test_a_trip_puts_the_oven_in_its_own_safe_state_not_back_to_the_start(toy):
    """The task declares its safe state (heater off): a trip ramps the heater there from
    wherever it was at the start, verified, and says so."""
    from core.registry import get_task
    from controller.policy import Policy
    from controller.session import run_session
    from safety.guard import InterlockRule

    definition = get_task("thermal")
    setup = definition.load_setup("oven")
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    plant.reset(4)
    plant.write_knobs(np.array([35.0]))  # found with the heater at 35 W
    plant.set_fault("DOOR_OPEN", 1)  # the case is 80 K hotter than the oven: the first step heats it over 120
    result = run_session(plant, Policy.load(toy["policy"], definition, setup),
                         interlocks=[InterlockRule("case_temperature", "max", 120.0)])
    assert result.status == "tripped" and result.restored
    assert plant.read_knobs()[0] == 0.0  # heater off, not 35 W
    restore = next(e for e in result.events if e.kind == "restore")
    assert restore.reason.startswith("heater off restored in 4 writes")  # 35 W down in steps of at most 10 W


def test_the_console_shows_the_toy(toy, oven, monkeypatch):
    """History shows a recorded oven session with its own panel; Run starts a simulated oven."""
    import httpx
    from streamlit.testing.v1 import AppTest

    from conftest import control_server
    from controller.machines import list_machines

    ioc, machine = oven
    assert toy["cli"]("run", "--machine", str(machine), "--policy", str(toy["policy"]), "--mode", "dry-run").returncode == 0
    list_machines.cache_clear()  # the toy is registered in this process now
    with control_server(toy["db"], "t") as url:
        monkeypatch.setenv("TBSAC_SERVER_URL", url)
        monkeypatch.setenv("TBSAC_OPERATOR_TOKEN", "t")
        app = str(TESTS.parent / "ui" / "console" / "app.py")
        at = AppTest.from_file(app, default_timeout=30)
        at.run()
        at.switch_page(str(Path(app).parent / "history.py"))
        at.run()
        assert not at.exception
        thermal = [s.id for s in sessions(toy) if s.task == "thermal"]
        at.selectbox(key="h-session").select(thermal[-1]).run()
        assert not at.exception
        assert "Oven temperature" in " ".join(m.value for m in at.markdown)
        at.button(key="h-replay").click().run()
        assert "recorded actions reproduced" in " ".join(s.value for s in at.success)
        machines = {m["name"]: m for m in httpx.get(url + "/api/machines").json()}
        assert machines["sim-oven"]["task"] == "thermal" and machines["sim-oven"]["knobs"][0]["unit"] == "W"
        at = AppTest.from_file(app, default_timeout=30)
        at.run()
        at.selectbox(key="machine").select("sim-oven").run()
        at.selectbox(key="policy").select(str(toy["policy"].resolve())).run()
        at.button[0].click().run()
        assert not at.exception
        started = httpx.get(url + "/api/sessions", params={"machine": "sim-oven"}).json()
        assert started and started[0]["task"] == "thermal"
