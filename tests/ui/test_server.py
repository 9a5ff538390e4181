"""The control server: HTTP API, operator token, live stream, crash recovery."""

import json
import os
import signal
import subprocess
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import _free_port, policy_with_recorded_success, tbsac_cmd
from controller.store import SessionRow, Store
from ui.server import create_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("TBSAC_DATA_DIR", str(tmp_path / "data"))
    store = Store(f"sqlite:///{tmp_path / 'server.sqlite'}")
    with TestClient(create_app(store, TOKEN, machine_dirs=[tmp_path]), base_url="http://127.0.0.1") as c:
        c.store = store
        yield c


def wait_status(client, sid, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/sessions/{sid}").json()
        if state["status"] in wanted and not state["live"]:
            return state
        time.sleep(0.05)
    raise AssertionError(f"session {sid} still {state['status']}: {state.get('result')}")


def start(client, **body):
    r = client.post("/api/sessions", json={"operator": "alice", **body}, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()["session"]


def test_reads_need_no_token_writes_do(client):
    assert client.get("/api/machines").status_code == 200
    names = [m["name"] for m in client.get("/api/machines").json()]
    assert "virtual-cafe2-cm1" in names and "sim-cafe2-cm2" in names
    body = {"machine": "sim-cafe2-cm1", "operator": "alice"}
    assert client.post("/api/sessions", json=body).status_code == 401
    assert client.post("/api/sessions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/openapi.json").json()["info"]["title"] == "tbsac control server"


def test_simulated_session_completes_and_is_recorded(client):
    sid = start(client, machine="sim-cafe2-cm1", seed=4)
    state = wait_status(client, sid, {"completed"})
    assert state["result"]["success"] and state["steps"] == state["result"]["steps"]
    steps = client.get(f"/api/sessions/{sid}/steps").json()
    assert [s["step"] for s in steps] == list(range(1, state["steps"] + 1))
    assert client.get(f"/api/sessions/{sid}/replay").json()["reproduced_fraction"] == 1.0
    csv_text = client.get(f"/api/sessions/{sid}/export").text
    n_events = len(client.get(f"/api/sessions/{sid}/events").json())
    assert csv_text.splitlines()[0].startswith("record,session,step,time,event,reason")
    assert len(csv_text.splitlines()) == 1 + state["steps"] + n_events  # steps and events, in time order
    listed = client.get("/api/sessions", params={"machine": "sim-cafe2-cm1", "status": "completed"}).json()
    assert [s["id"] for s in listed] == [sid]
    policies = client.get("/api/policies").json()
    assert "cafe2-cm1" in policies["pretrained"]
    assert policies["recorded"][0]["deployed_on"] == ["sim-cafe2-cm1"]


def test_one_active_session_per_machine_and_approve_flow(client):
    sid = start(client, machine="sim-cafe2-cm1", mode="approve", seed=5)
    deadline = time.monotonic() + 10
    while client.get(f"/api/sessions/{sid}").json()["pending"] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pending = client.get(f"/api/sessions/{sid}").json()["pending"]
    assert pending and len(pending["proposed"]) == 10
    second = client.post("/api/sessions", json={"machine": "sim-cafe2-cm1", "operator": "bob"}, headers=AUTH)
    assert second.status_code == 409 and "already has an active session" in second.json()["detail"]
    assert client.get(f"/api/sessions/{sid}/steps").json() == []  # nothing written yet
    # A stale proposal id is refused: the operator must approve what they saw.
    stale = client.post(f"/api/sessions/{sid}/approve", json={"operator": "alice", "proposal": pending["id"] + 1}, headers=AUTH)
    assert stale.status_code == 409 and "no longer pending" in stale.text
    approved = 0
    while client.get(f"/api/sessions/{sid}").json()["live"]:
        pending = client.get(f"/api/sessions/{sid}").json()["pending"]
        if pending is None:
            time.sleep(0.01)
            continue
        r = client.post(f"/api/sessions/{sid}/approve", json={"operator": "alice", "proposal": pending["id"]}, headers=AUTH)
        assert r.status_code in (200, 409)
        approved += r.status_code == 200
        # A second click on the same proposal never approves the next one.
        again = client.post(f"/api/sessions/{sid}/approve", json={"operator": "alice", "proposal": pending["id"]}, headers=AUTH)
        assert again.status_code == 409
    state = wait_status(client, sid, {"completed"})
    kinds = [e["kind"] for e in client.get(f"/api/sessions/{sid}/events").json()]
    assert kinds.count("approve") == kinds.count("approved") == approved == state["steps"] + 1  # + the reset probe
    listed = next(x for x in client.get("/api/sessions").json() if x["id"] == sid)
    assert listed["decided_by"] == {"approved": ["alice"], "rejected": []}
    # The logbook report: who, the result, what the machine was left at, every step and event.
    report = client.get(f"/api/sessions/{sid}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    text = report.text
    assert text.startswith(f"# Session {sid}: completed on sim-cafe2-cm1")
    assert "| approved by, rejected by | alice, - |" in text and "machine left: at the session's final settings" in text
    rms = state["result"]
    assert f"{rms['initial_rms_mm']:.4g} → {rms['final_rms_mm']:.4g} in {state['steps']} steps" in text
    step_lines = [line for line in text.split("## Events")[0].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(step_lines) == state["steps"]
    assert text.count("**approve**") == approved
    # The export: every step names who approved it, and the events are in it too.
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/sessions/{sid}/export").text)))
    steps = [r for r in rows if r["record"] == "step"]
    assert len(steps) == state["steps"] and all(r["approved by"] == "alice" for r in steps)
    assert sum(r["record"] == "event" and r["event"] == "approve" for r in rows) == approved


def test_pause_resume_abort_and_restore(client):
    sid = start(client, machine="sim-cafe2-cm2", mode="approve", seed=6)
    time.sleep(0.3)
    assert client.post(f"/api/sessions/{sid}/pause", headers=AUTH).status_code == 200
    assert client.get(f"/api/sessions/{sid}").json()["status"] == "paused"
    assert client.post(f"/api/sessions/{sid}/resume", headers=AUTH).status_code == 200
    assert client.post(f"/api/sessions/{sid}/abort", json={"operator": "carol"}, headers=AUTH).status_code == 200
    state = wait_status(client, sid, {"aborted"})
    assert state["result"]["restored"] and "operator abort by carol" in state["result"]["trips"][0]
    r = client.post(f"/api/sessions/{sid}/restore", headers=AUTH)
    assert r.status_code == 200
    text = client.get(f"/api/sessions/{sid}/report").text
    assert "machine left: starting settings restored" in text and "operator abort by carol" in text
    assert client.get("/api/sessions/999/report").status_code == 404
    assert client.post(f"/api/sessions/{sid}/pause", headers=AUTH).status_code == 409


def test_stream_sends_steps_events_and_end(client):
    sid = start(client, machine="sim-cafe2-cm3", seed=7)
    text = client.get(f"/api/sessions/{sid}/stream").text
    kinds = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event:")]
    assert kinds.count("step") >= 1 and kinds[-1] == "end"
    end = json.loads(text.strip().splitlines()[-1].split("data: ", 1)[1])
    assert end["status"] == "completed"


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"machine": "sim-cafe2-cm1"}, 422, "operator"),
        ({"machine": "sim-cafe2-cm1", "operator": "a", "mode": "yolo"}, 422, "mode"),
        ({"machine": "sim-cafe2-cm1", "operator": "a", "seed": -1}, 422, "seed"),
        ({"machine": "sim-cafe2-cm1", "operator": "a", "colour": "red"}, 422, "colour"),
        ({"machine": "nowhere", "operator": "a"}, 403, "nowhere"),
        ({"machine": "sim-cafe2-cm2", "operator": "a", "policy": "/nonexistent.pt"}, 403, "/nonexistent.pt"),
        # a NUL character made the path check fail with a server error (found by the schema fuzzing)
        ({"machine": "\u0000", "operator": "0"}, 422, "machine"),
        ({"machine": "sim-cafe2-cm2", "operator": "a", "policy": "x\u0000.pt"}, 422, "policy"),
        ({"machine": "sim-cafe2-cm2", "operator": "a\u0000"}, 422, "operator"),
    ],
)
def test_malformed_requests_get_4xx_naming_the_problem(client, body, status, needle):
    r = client.post("/api/sessions", json=body, headers=AUTH)
    assert r.status_code == status
    assert needle in r.text


def test_unknown_session_and_command(client):
    assert client.get("/api/sessions/999").status_code == 404
    assert client.post("/api/sessions/999/abort", headers=AUTH).status_code == 404
    assert client.post("/api/sessions/1/explode", headers=AUTH).status_code == 422
    assert client.get("/api/sessions", params={"status": "bogus"}).status_code == 422
    assert client.get("/api/sessions", params={"machine": "a\x00b"}).status_code == 422


def test_http_session_on_virtual_ioc_and_cli_replay(client, start_ioc, run_cli, tmp_path):
    ioc = start_ioc(seed=12, ramp=0.05)
    sid = start(client, machine=str(ioc.machine_file()))
    state = wait_status(client, sid, {"completed"})
    assert state["result"]["success"] and state["result"]["trips"] == []
    assert len(ioc.puts()) == 10 * (state["steps"] + 2)  # the mismatch pilot, the opening probe, every step
    proc = run_cli("replay", str(sid), "--json", env={"TBSAC_DATABASE_URL": client.store.url})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["steps"] == state["steps"] and report["reproduced_fraction"] == 1.0


def test_auto_sessions_are_paced_by_the_machine_file_and_stop_between_steps(client, start_ioc):
    import datetime as dt

    ioc = start_ioc(seed=12, ramp=0.05)
    sid = start(client, machine=str(ioc.machine_file(min_step_interval_s=2.0)))
    deadline = time.monotonic() + 60
    while len(client.get(f"/api/sessions/{sid}/steps").json()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.post(f"/api/sessions/{sid}/abort", json={"operator": "carol"}, headers=AUTH).status_code == 200
    state = wait_status(client, sid, {"aborted"})
    assert state["result"]["restored"] and "operator abort by carol" in state["result"]["trips"][0]
    steps = client.get(f"/api/sessions/{sid}/steps").json()
    times = [dt.datetime.fromisoformat(s["time"]) for s in steps]
    assert 2 <= len(steps) <= 3  # stopped in the pause between steps, not after the episode
    assert all(b - a >= dt.timedelta(seconds=1.95) for a, b in zip(times, times[1:]))


def test_server_killed_mid_session_stops_the_session_and_restores(start_ioc, tmp_path, run_cli):
    """The session runs in a process of its own: when the server dies (SIGKILL) nobody can
    supervise it any more, so it aborts itself and restores the machine; every step is kept."""
    ioc = start_ioc(seed=13, ramp=0.5)
    port = _free_port()
    env = {**os.environ, "TBSAC_DATA_DIR": str(tmp_path / "data"), "TBSAC_DATABASE_URL": f"sqlite:///{tmp_path / 'srv.sqlite'}",
           "TBSAC_OPERATOR_TOKEN": TOKEN}
    cmd = [*tbsac_cmd(), "serve", "--port", str(port), "--machine-dir", str(tmp_path)]

    def serve():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    return proc
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    server = serve()
    base = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{base}/api/sessions", json={"machine": str(ioc.machine_file()), "operator": "alice"}, headers=AUTH, timeout=30)
        assert r.status_code == 201, r.text
        sid = r.json()["session"]
        deadline = time.monotonic() + 60
        while len(httpx.get(f"{base}/api/sessions/{sid}/steps").json()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        committed = httpx.get(f"{base}/api/sessions/{sid}/steps").json()
        assert len(committed) >= 2
        server.send_signal(signal.SIGKILL)
        server.wait()
        n_before = len(Store(env["TBSAC_DATABASE_URL"], upgrade=False).steps(sid))
        assert n_before >= len(committed)

        deadline = time.monotonic() + 60
        while Store(env["TBSAC_DATABASE_URL"], upgrade=False).get(SessionRow, sid).status == "running":
            assert time.monotonic() < deadline, "the orphaned session did not stop"
            time.sleep(0.2)
        server = serve()
        state = httpx.get(f"{base}/api/sessions/{sid}").json()
        assert state["status"] == "aborted" and state["result"]["restored"], state
        assert any("control server lost" in t for t in state["result"]["trips"])
        assert state["steps"] >= n_before
        assert all(p["value"] == 0.0 for p in ioc.puts()[-10:])  # restored by the session itself
        restore = httpx.post(f"{base}/api/sessions/{sid}/restore", json={"operator": "alice"}, headers=AUTH, timeout=60)
        assert restore.status_code == 200, restore.text
        machine_setpoints = [p for p in ioc.puts()][-10:]
        assert all(p["value"] == 0.0 for p in machine_setpoints)
        kinds = [e["kind"] for e in httpx.get(f"{base}/api/sessions/{sid}/events").json()]
        assert kinds[-1] == "restore"
    finally:
        server.terminate()
        server.wait(10)


def test_sessions_are_filtered_in_the_query_by_machine_operator_task_and_day(client):
    import datetime as dt

    a = start(client, machine="sim-cafe2-cm1", seed=1)
    wait_status(client, a, ("completed", "not_converged"))
    b = start(client, machine="sim-lpi", seed=1, operator="bob")
    wait_status(client, b, ("completed", "not_converged"))
    ids = lambda **q: [s["id"] for s in client.get("/api/sessions", params=q).json()]  # noqa: E731
    assert ids() == [b, a]
    assert ids(machine="sim-cafe2-cm1") == [a] and ids(machine="sim-cafe2-cm1", limit=1) == [a]  # filtered before the page
    assert ids(operator="bob") == [b] and ids(task="orbit") == [a] and ids(task="rfq") == [b]
    today = dt.datetime.now(dt.timezone.utc).date()
    assert ids(started_from=today.isoformat(), started_to=today.isoformat()) == [b, a]
    assert ids(started_to=(today - dt.timedelta(days=1)).isoformat()) == []
    bad = client.get("/api/sessions", params={"started_from": today.isoformat(), "started_to": "2020-01-01"})
    assert bad.status_code == 422 and "before started_from" in bad.text


def wait_live(client, name, condition, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = client.get(f"/api/machines/{name}/live").json()
        if condition(live):
            return live
        time.sleep(0.05)
    raise AssertionError(f"machine {name} live state never matched: {live}")


def test_machine_live_state_follows_the_ioc_without_a_session(client, start_ioc):
    """The console's interlock panel asks the machine itself: a killed IOC shows as
    disconnected (no session reads it while waiting for an operator), and back when it is."""
    ioc = start_ioc(seed=3)
    ioc.prefix = "VCAFE2:CM1"  # the shipped machine file's names
    ioc.stop()
    ioc.start()
    live = wait_live(client, "virtual-cafe2-cm1", lambda s: s["ok"])
    assert [c["name"] for c in live["channels"]] == ["beam_current", "mps_ok"]
    assert all(c["connected"] and c["value"] > 0 and c["problem"] == "" for c in live["channels"])
    ioc.kill()
    down = wait_live(client, "virtual-cafe2-cm1", lambda s: not any(c["connected"] for c in s["channels"]))
    assert not down["ok"] and all(c["value"] is None for c in down["channels"])
    assert all("no connection to VCAFE2:CM1:" in c["problem"] and "IOC down" in c["problem"] for c in down["channels"])
    ioc.start()
    back = wait_live(client, "virtual-cafe2-cm1", lambda s: s["ok"], timeout=40)
    assert back["channels"][0]["value"] > 0
    sim = client.get("/api/machines/sim-cafe2-cm1/live").json()
    assert sim["watched"] is False and "session" in sim["why"]
    missing = client.get("/api/machines/nowhere/live")
    assert missing.status_code == 404 and "nowhere" in missing.json()["detail"]


def test_dial_in_a_recorded_step_goes_there_write_by_approved_write(client):
    sid = start(client, machine="sim-cafe2-cm1", seed=6)
    wait_status(client, sid, {"completed"})
    steps = client.get(f"/api/sessions/{sid}/steps").json()
    target = steps[1]["readbacks"]  # step 2 of the session
    for body, status, needle in (({"operator": "carol", "step": len(steps) + 1}, 400, f"recorded steps 1 to {len(steps)}"),
                                 ({"operator": "carol", "step": 0}, 422, "step"), ({"step": 1}, 422, "operator")):
        r = client.post(f"/api/sessions/{sid}/dial-in", json=body, headers=AUTH)
        assert r.status_code == status and needle in r.text, r.text
    assert client.post("/api/sessions/999/dial-in", json={"operator": "carol", "step": 1}, headers=AUTH).status_code == 404
    assert client.post(f"/api/sessions/{sid}/dial-in", json={"operator": "carol", "step": 2}).status_code == 401
    r = client.post(f"/api/sessions/{sid}/dial-in", json={"operator": "carol", "step": 2}, headers=AUTH)
    assert r.status_code == 201, r.text
    dial = r.json()["session"]
    approved = 0
    while client.get(f"/api/sessions/{dial}").json()["live"]:
        pending = client.get(f"/api/sessions/{dial}").json()["pending"]
        if pending is None:
            time.sleep(0.01)
            continue
        r = client.post(f"/api/sessions/{dial}/approve", json={"operator": "carol", "proposal": pending["id"]}, headers=AUTH)
        approved += r.status_code == 200
    state = wait_status(client, dial, {"completed"})
    assert state["mode"] == "approve" and state["operator"] == "carol" and approved >= 1
    events = client.get(f"/api/sessions/{dial}/events").json()
    assert events[0]["kind"] == "start" and events[0]["reason"] == f"dialling in step 2 of session {sid}"
    done = events[-1]
    assert done["kind"] == "dial_in" and done["reason"].endswith("and verified")
    assert done["data"]["knobs"] == pytest.approx(target, abs=1e-6) and done["data"]["writes"] == approved
    assert [e["kind"] for e in events].count("approve") == approved
    # Rejecting a dial-in puts the machine back where that session found it.
    r = client.post(f"/api/sessions/{sid}/dial-in", json={"operator": "carol", "step": len(steps)}, headers=AUTH)
    rejected = r.json()["session"]
    deadline = time.monotonic() + 30
    while (pending := client.get(f"/api/sessions/{rejected}").json()["pending"]) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    client.post(f"/api/sessions/{rejected}/reject", json={"operator": "carol", "proposal": pending["id"]}, headers=AUTH)
    state = wait_status(client, rejected, {"rejected"})
    assert state["result"]["restored"]


def test_dial_in_on_an_epics_machine_is_that_machine_s_active_session(client, start_ioc):
    """On a shipped machine file the dial-in runs under the machine's name: the console sees
    it as the machine's active session (Start disabled), and the IOC ends at the step's setting."""
    import yaml

    from hardware.machine import MACHINE_DIR

    ioc = start_ioc(seed=21, ramp=0.05)
    ioc.prefix = "VCAFE2:CM1"  # the shipped machine file's names
    ioc.stop()
    ioc.start()
    sid = start(client, machine="virtual-cafe2-cm1")
    wait_status(client, sid, {"completed"})
    target = client.get(f"/api/sessions/{sid}/steps").json()[0]["readbacks"]
    dial = client.post(f"/api/sessions/{sid}/dial-in", json={"operator": "dora", "step": 1}, headers=AUTH).json()["session"]
    busy = {m["name"]: m["active_session"] for m in client.get("/api/machines").json()}
    assert busy["virtual-cafe2-cm1"] == dial
    while client.get(f"/api/sessions/{dial}").json()["live"]:
        pending = client.get(f"/api/sessions/{dial}").json()["pending"]
        if pending:
            client.post(f"/api/sessions/{dial}/approve", json={"operator": "dora", "proposal": pending["id"]}, headers=AUTH)
        time.sleep(0.02)
    state = wait_status(client, dial, {"completed"})
    assert state["machine"] == "virtual-cafe2-cm1"
    knobs = yaml.safe_load((MACHINE_DIR / "virtual-cafe2-cm1.yaml").read_text())["knobs"]
    last = {p["pv"]: p["value"] for p in ioc.puts()}  # what the IOC was last told, per setpoint PV
    for knob in knobs:
        assert last[knob["setpoint"]] == pytest.approx(target[knob["name"]] * knob["scale"], abs=1e-3)


def test_auto_session_with_a_policy_that_failed_its_own_evaluation_gets_4xx_and_a_dry_run_may_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("TBSAC_DATA_DIR", str(tmp_path / "data"))
    path = policy_with_recorded_success(tmp_path, 0.2)
    store = Store(f"sqlite:///{tmp_path / 'server.sqlite'}")
    with TestClient(create_app(store, TOKEN, policy_dirs=[tmp_path]), base_url="http://127.0.0.1") as client:
        r = client.post("/api/sessions", json={"operator": "alice", "machine": "sim-cafe2-cm1", "policy": path}, headers=AUTH)
        assert 400 <= r.status_code < 500 and "reached the target in 20%" in r.text
        assert client.get("/api/sessions").json() == []  # nothing recorded, nothing ran
        sid = start(client, machine="sim-cafe2-cm1", seed=4, policy=path, mode="dry-run")
        wait_status(client, sid, {"dry-run"})
        events = client.get(f"/api/sessions/{sid}/events").json()
        assert any("reached the target in 20%" in e["reason"] for e in events if e["kind"] == "warning"), events
