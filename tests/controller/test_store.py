"""The session store against SQLite and PostgreSQL."""

import csv
import os
import subprocess

import pytest
from sqlalchemy import create_engine, inspect, text

from controller.policy import Policy
from controller.machines import open_machine
from controller.recording import SessionRecorder
from controller.replay import export, replay, step_rows
from controller.session import run_session
from controller.store import SessionRow, Store
from simulators.beamline.lattice import load_lattice
from core.config import ConfigError
from conftest import for_setup


def record_sim_session(store, seed=3, mode="auto", on_step=None, machine="sim-cafe2-cm1", **kwargs):
    opened = open_machine(machine, seed, "test")
    plant = opened.plant
    policy = Policy.load("pretrained", opened.definition, opened.setup)
    recorder = SessionRecorder(store, opened.record, policy, "alice", mode, None, plant)

    def step_hook(record):
        recorder.on_step(record)
        if on_step:
            on_step(recorder, record)

    result = run_session(plant, policy, mode=mode, on_step=step_hook, on_event=recorder.on_event, **kwargs)
    recorder.finish(result)
    return recorder.session_id, result


def test_migrations_create_the_schema_at_head(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"machines", "policies", "training_runs", "evaluations", "sessions", "steps", "events", "measurements",
            "alembic_version"} <= tables
    with store.engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == "0006"
    columns = {t: {c["name"] for c in inspect(store.engine).get_columns(t)} for t in ("training_runs", "policies")}
    assert {"sweep", "trial"} <= columns["training_runs"] and "content" in columns["policies"]
    Store(store.url)  # upgrading an up-to-date database is a no-op


def test_upgrade_from_the_first_schema_keeps_data(store_url):
    from alembic import command
    from alembic.config import Config
    from pathlib import Path

    import controller.store as store_module

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", store_url)
    command.upgrade(cfg, "0001")
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("insert into machines (name, kind, content, sha256, created) values ('m', 'epics', 'x', 'abc', CURRENT_TIMESTAMP)"))
    engine.dispose()
    upgraded = Store(store_url)
    assert "evaluations" in inspect(upgraded.engine).get_table_names()
    assert upgraded.machine_names() == {1: "m"}
    upgraded.engine.dispose()


def test_session_steps_and_events_are_recorded(store):
    sid, result = record_sim_session(store)
    row = store.get(SessionRow, sid)
    assert row.status == "completed" and row.result["success"] and row.operator == "alice"
    steps = store.steps(sid)
    assert [s.step for s in steps] == list(range(1, result.steps + 1))
    s = steps[0]
    assert len(s.observation) == 30 and len(s.action) == 10 and len(s.safe) == 10 and len(s.readings) == 10
    assert list(s.safe) == [f"DC{p}{i}" for i in range(1, 6) for p in "HV"] and "BPM5:y" in s.readings
    assert s.metrics["rms_mm"] == pytest.approx(result.step_records[0].metrics["rms_mm"])
    assert row.task == "orbit" and row.layout["metrics"][0]["name"] == "rms_mm" and row.layout["readings"][0]["unit"] == "mm"
    assert s.time.year >= 2026


def test_each_step_is_committed_as_it_happens(store, store_url):
    seen = []
    other = create_engine(store_url)  # a second connection, like a console reading

    def check(recorder, record):
        with other.connect() as conn:
            seen.append(conn.execute(text("select count(*) from steps where session_id = :s"), {"s": recorder.session_id}).scalar())

    sid, result = record_sim_session(store, on_step=check)
    other.dispose()
    assert seen == list(range(1, result.steps + 1))


def test_trips_are_recorded_as_events(store):
    from safety.guard import SafetyConfig

    sid, result = record_sim_session(store, safety=SafetyConfig(max_steps=2))
    assert result.status == "tripped"
    kinds = [e.kind for e in store.events(sid)]
    assert "trip" in kinds and "restore" in kinds
    assert store.get(SessionRow, sid).status == "tripped"


def test_interrupted_sessions_are_marked(store):
    machine = store.add_machine("m", "simulated", "x")
    policy = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm1")))
    from controller.recording import register_policy

    live = store.start_session(machine.id, register_policy(store, policy), "bob", "auto", None, {})
    assert live.holder.endswith(f":{os.getpid()}")
    dead = store.start_session(machine.id, register_policy(store, policy), "bob", "auto", None, {})
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that existed and is gone
    with store.Session.begin() as s:
        s.get(SessionRow, dead.id).holder = live.holder.rsplit(":", 1)[0] + f":{gone.pid}"
    assert store.mark_interrupted() == [dead.id]  # the live session (this process) is left alone
    assert store.get(SessionRow, dead.id).status == "interrupted" and store.get(SessionRow, live.id).status == "running"
    assert store.mark_interrupted() == []


def test_replay_reproduces_every_action(store):
    sid, result = record_sim_session(store, seed=8)
    report = replay(store, sid)
    assert report["steps"] == result.steps and report["reproduced_fraction"] == 1.0
    assert report["metric"] == "rms_mm" and report["metric_trace"][-1] < 0.5


def test_replay_detects_a_tampered_action(store):
    sid, _ = record_sim_session(store, seed=9)
    with store.engine.begin() as conn:
        conn.execute(text("update steps set action = :a where session_id = :s and step = 1"),
                     {"a": "[0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]", "s": sid})
    report = replay(store, sid)
    assert report["reproduced"] == report["steps"] - 1 and report["mismatches"][0]["step"] == 1



def test_replay_audits_an_rfq_walk_back_to_the_best_setting(store):
    """The walk back is not the policy's: replay recomputes it from the recorded target and settings."""
    sid, result = record_sim_session(store, seed=11, machine="sim-lpi")  # this injector ends with a walk back
    report = replay(store, sid)
    walk = next(e for e in store.events(sid) if e.kind == "return_to_best").data
    assert [r["by"] for r in report["table"]] == ["policy"] * (walk["from_step"] - 1) + ["return to best"] * (
        result.steps - walk["from_step"] + 1)
    assert report["reproduced"] == report["steps"] == result.steps
    assert report["table"][-1]["metrics"]["transmission"] == pytest.approx(result.final)
    with store.engine.begin() as conn:  # a walk step that did not head for the target is caught
        conn.execute(text("update steps set action = :a where session_id = :s and step = :k"),
                     {"a": "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5]", "s": sid, "k": result.steps})
    report = replay(store, sid)
    assert [m["step"] for m in report["mismatches"]] == [result.steps]
    assert report["reproduced"] == report["steps"] - 1

def test_export_csv_and_parquet(store, tmp_path):
    import pyarrow.parquet as pq

    sid, result = record_sim_session(store, seed=10)
    rows = step_rows(store, sid)
    steps = [r for r in rows if r["record"] == "step"]
    n_events = len(store.events(sid))
    assert len(steps) == result.steps and len(rows) == result.steps + n_events
    assert "safe:DCH1 (simulator units)" in rows[0] and "reading:BPM5:y (mm)" in rows[0] and "rms_mm (mm)" in rows[0]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert rows[0]["record"] == "event" and rows[0]["event"] == "start" and rows[0]["reason"].startswith("starting orbit RMS")
    with open(export(store, sid, "csv", tmp_path / "s.csv")) as f:
        assert len(list(csv.DictReader(f))) == result.steps + n_events
    table = pq.read_table(export(store, sid, "parquet", tmp_path / "s.parquet"))
    assert table.num_rows == result.steps + n_events and "interlock:beam_current" in table.column_names
    with pytest.raises(ConfigError, match="format"):
        export(store, sid, "xlsx", tmp_path / "s.xlsx")
    report = export(store, sid, "md", tmp_path / "s.md").read_text()  # the logbook report
    assert report.startswith(f"# Session {sid}: completed on sim-cafe2-cm1") and "| operator, mode | alice, auto |" in report
    assert sum(line.startswith("| ") and line[2].isdigit() for line in report.splitlines()) == result.steps
    changes = [line.rsplit("|", 2)[-2].strip() for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert all(c.split()[0].startswith("DC") and float(c.split()[1]) != 0 for c in changes), changes  # the knob moved most


def test_unknown_session(store):
    with pytest.raises(ConfigError, match="no such session"):
        replay(store, 12345)


def test_training_run_and_policy_lineage(store):
    run = store.start_training_run(task="orbit", lattice="cafe2-cm1", errors="train", arch="tbsac", steps=10, seed=1, out_dir="/tmp/x")
    store.finish_training_run(run.id, "completed", {"best_step": 10}, [{"step": 10}])
    policy = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm1")))
    from controller.policy import file_sha256

    row = store.add_policy(policy.path, file_sha256(policy.path), policy.metadata, training_run_id=run.id)
    again = store.add_policy(policy.path, file_sha256(policy.path), policy.metadata)
    assert row.id == again.id and row.training_run_id == run.id


@pytest.mark.parametrize("machine, seed, metric", [("sim-cafe2-cm1", 4, "rms_mm"), ("sim-lpi", 11, "transmission")])
def test_sessions_recorded_before_the_generic_records_still_replay_and_export(store_url, machine, seed, metric):
    """A session written by the 0002 schema (steps as bare lists, the orbit RMS in its own
    column) lists, replays 100 % and exports after the 0003 migration."""
    import json
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    import controller.store as store_module
    from controller.policy import file_sha256

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store_module.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", store_url)
    command.upgrade(cfg, "0002")
    opened = open_machine(machine, seed, "test")
    policy = Policy.load("pretrained", opened.definition, opened.setup)
    result = run_session(opened.plant, policy)
    walk = next((e for e in result.events if e.kind == "return_to_best"), None)
    engine = create_engine(store_url)
    with engine.begin() as conn:  # rows exactly as the 0002 code wrote them
        conn.execute(text("insert into machines (name, kind, content, sha256, created) values (:n, 'simulated', 'x', 'abc', CURRENT_TIMESTAMP)"),
                     {"n": machine})
        conn.execute(text("insert into policies (sha256, path, lattice, metadata, created) values (:h, :p, :l, :m, CURRENT_TIMESTAMP)"),
                     {"h": file_sha256(policy.path), "p": str(policy.path), "l": opened.setup.name, "m": json.dumps(policy.metadata)})
        conn.execute(text("insert into sessions (machine_id, policy_id, operator, mode, status, started, task_config, result) "
                          "values (1, 1, 'carol', 'auto', :st, CURRENT_TIMESTAMP, '{}', '{}')"), {"st": result.status})
        for r in result.step_records:
            rms = r.metrics.get("rms_mm")
            conn.execute(text("insert into steps (session_id, step, observation, action, proposed, safe, readbacks, readings, "
                              "interlocks, reward, rms_mm, latency_s, time) values (1, :k, :o, :a, :p, :s, :rb, :rd, '{}', :rw, :rms, "
                              ":lat, CURRENT_TIMESTAMP)"),
                         {"k": r.step, "o": json.dumps(r.observation), "a": json.dumps(r.action), "p": json.dumps(r.proposed),
                          "s": json.dumps(r.safe), "rb": json.dumps(r.readbacks), "rd": json.dumps(r.readings), "rw": r.reward,
                          "rms": rms, "lat": r.latency_s})
        if walk:
            conn.execute(text("insert into events (session_id, time, kind, reason, data) values (1, CURRENT_TIMESTAMP, :k, 'x', :d)"),
                         {"k": walk.kind, "d": json.dumps(walk.data)})
    engine.dispose()
    upgraded = Store(store_url)
    assert [r.id for r in upgraded.list(SessionRow)] == [1]
    report = replay(upgraded, 1)
    assert report["steps"] == result.steps and report["reproduced_fraction"] == 1.0
    assert report["metric_trace"] == pytest.approx([r.metrics[metric] for r in result.step_records])
    rows = [r for r in step_rows(upgraded, 1) if r["record"] == "step"]
    knob = opened.plant.knobs[0]
    assert len(rows) == result.steps and any(k.startswith(f"safe:{knob.name} (") for k in rows[0])
    assert rows[-1][f"reading:{opened.plant.readings[-1].name} ({opened.plant.readings[-1].unit})"] == pytest.approx(
        result.step_records[-1].readings[-1])
    upgraded.engine.dispose()
