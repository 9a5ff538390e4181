"""Console page logic with Streamlit's AppTest, against a real control server."""

import time
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from conftest import _free_port, control_server

APP = str(Path(__file__).resolve().parents[2] / "ui" / "console" / "app.py")
TOKEN = "console-token"


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A control server on loopback (uvicorn in a thread) with a fresh SQLite store."""
    monkeypatch.setenv("TBSAC_DATA_DIR", str(tmp_path / "data"))
    with control_server(f"sqlite:///{tmp_path / 'console.sqlite'}", TOKEN) as url:
        monkeypatch.setenv("TBSAC_SERVER_URL", url)
        monkeypatch.setenv("TBSAC_OPERATOR_TOKEN", TOKEN)
        yield url


def run_session(url: str, **body) -> int:
    r = httpx.post(url + "/api/sessions", json={"operator": "alice", **body}, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=60)
    sid = r.json()["session"]
    while httpx.get(f"{url}/api/sessions/{sid}").json()["live"]:
        time.sleep(0.05)
    return sid


def app_test(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    if page:
        at.switch_page(str(Path(APP).parent / page))
        at.run()
    return at


def texts(at) -> str:
    return " ".join([m.value for m in at.markdown] + [e.value for e in at.error] + [i.value for i in at.info]
                    + [w.value for w in at.warning] + [s.value for s in at.success])


def test_server_unreachable_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TBSAC_SERVER_URL", f"http://127.0.0.1:{_free_port()}")
    at = app_test()
    assert not at.exception
    assert "Control server unreachable" in texts(at) and "tbsac serve" in texts(at)


def test_run_page_starts_a_simulated_session(server):
    at = app_test()
    assert not at.exception
    at.selectbox(key="machine").select("sim-cafe2-cm1").run()
    at.button[0].click().run()  # Start
    assert not at.exception
    sessions = httpx.get(server + "/api/sessions").json()
    assert len(sessions) == 1 and sessions[0]["machine"] == "sim-cafe2-cm1" and sessions[0]["operator"]
    deadline = time.time() + 20
    while httpx.get(f"{server}/api/sessions/{sessions[0]['id']}").json()["live"] and time.time() < deadline:
        time.sleep(0.05)
    at.run()
    assert f"Session {sessions[0]['id']}" in texts(at) and "completed" in texts(at)
    assert "beam_current" in texts(at)  # the interlock panel


def test_run_page_approve_mode_shows_the_proposed_step(server):
    at = app_test()
    at.selectbox(key="machine").select("sim-cafe2-cm2").run()
    at.radio(key="mode").set_value("approve").run()
    at.button[0].click().run()
    sid = httpx.get(server + "/api/sessions").json()[0]["id"]
    for _ in range(100):
        if httpx.get(f"{server}/api/sessions/{sid}").json()["pending"]:
            break
        time.sleep(0.05)
    at.run()
    assert "waiting for your approval" in texts(at)
    approve = next(b for b in at.button if b.label == "Approve")
    approve.click().run()
    events = [e["kind"] for e in httpx.get(f"{server}/api/sessions/{sid}/events").json()]
    assert "approve" in events
    abort = next(b for b in at.button if b.label == "Stop")  # the red one: abort and restore
    abort.click().run()
    for _ in range(100):
        if not httpx.get(f"{server}/api/sessions/{sid}").json()["live"]:
            break
        time.sleep(0.05)
    assert httpx.get(f"{server}/api/sessions/{sid}").json()["status"] == "aborted"


def test_start_without_token_is_explained(server, monkeypatch):
    monkeypatch.setenv("TBSAC_OPERATOR_TOKEN", "")
    at = app_test()
    at.selectbox(key="machine").select("sim-cafe2-cm1").run()
    at.button[0].click().run()
    assert "operator token" in texts(at)
    assert httpx.get(server + "/api/sessions").json() == []


def test_history_page_slider_redraws_and_replays(server):
    first = run_session(server, machine="sim-cafe2-cm1", seed=1)
    second = run_session(server, machine="sim-cafe2-cm1", seed=2)
    at = app_test("history.py")
    assert not at.exception
    assert at.selectbox(key="h-session").value == second
    at.selectbox(key="h-session").select(first).run()
    n = len(httpx.get(f"{server}/api/sessions/{first}/steps").json())
    assert at.slider(key="h-step").value == n
    at.slider(key="h-step").set_value(1).run()
    assert not at.exception and "step 1 at" in " ".join(c.value for c in at.caption)
    at.button(key="h-replay").click().run()
    assert f"{n} of {n} recorded actions reproduced" in texts(at)
    at.selectbox(key="h-status").select("tripped").run()
    assert "No recorded sessions match" in texts(at)
    at.selectbox(key="h-status").select("all").run()
    at.text_input(key="h-operator").input("bob").run()
    assert "No recorded sessions match" in texts(at)
    at.text_input(key="h-operator").input("alice").run()
    at.selectbox(key="h-task").select("orbit").run()
    assert list(at.dataframe[0].value["session"]) == [second, first]
    at.selectbox(key="h-task").select("crop").run()
    assert "No recorded sessions match" in texts(at)


def test_training_page_lists_runs_evaluations_and_deployments(server, tmp_path):
    from controller.store import Store

    store = Store(f"sqlite:///{tmp_path / 'console.sqlite'}")
    run = store.start_training_run(task="orbit", lattice="cafe2-cm1", errors="train", arch="tbsac", steps=2000, seed=1, out_dir="x",
                                   sweep="nightly", trial="003-cafe2-cm1-train-seed1")
    curve = [{"step": 1000, "success_rate": 0.5, "steps": {"median": 9.0}, "final_rms_mm": {"p95": 0.9}},
             {"step": 2000, "success_rate": 1.0, "steps": {"median": 5.0}, "final_rms_mm": {"p95": 0.48}}]
    store.finish_training_run(run.id, "completed", {"best_step": 2000, "best": curve[1] | {"final_rms_mm": {"p95": 0.48}}}, curve)
    store.add_evaluation(None, {"task": "orbit", "lattice": "cafe2-cm1", "errors": "test", "episodes": 3, "seed": 1000, "results": {
        "agent": {"success_rate": 1.0, "final_rms_mm": {"p95": 0.49}, "steps": {"median": 5}},
        "svd_model": {"success_rate": 1.0, "final_rms_mm": {"p95": 0.44}, "steps": {"median": 3}}}})
    run_session(server, machine="sim-cafe2-cm3", seed=3)
    at = app_test("training.py")
    assert not at.exception
    frames = [df.value for df in at.dataframe]
    assert frames[0]["best step"].tolist() == [2000]
    assert frames[0]["sweep / trial"].tolist() == ["nightly / 003-cafe2-cm1-train-seed1"]  # a `tbsac sweep` trial
    assert set(frames[1]["method"]) == {"agent", "svd_model"}
    assert frames[2]["deployed on"].tolist() == ["sim-cafe2-cm3"]


def test_training_page_shows_an_rfq_run(server, tmp_path):
    """Every task's periodic evaluation is charted (an RFQ run once raised KeyError 'success_rate')."""
    from controller.store import Store

    store = Store(f"sqlite:///{tmp_path / 'console.sqlite'}")
    run = store.start_training_run(task="rfq", lattice="lpi", errors="train", arch="mlp", steps=10000, seed=0, out_dir="x")
    curve = [{"step": 5000, "fraction_of_best": {"median": 0.9, "p5": 0.7}, "steps_to_85": {"median": 14, "reached": 17}},
             {"step": 10000, "fraction_of_best": {"median": 0.97, "p5": 0.9}, "steps_to_85": {"median": 9, "reached": 19}}]
    store.finish_training_run(run.id, "completed", {"best_step": 10000, "best": curve[1]}, curve)
    store.add_evaluation(None, {"task": "rfq", "lattice": "lpi", "errors": "test", "episodes": 2, "seed": 1000, "results": {
        "agent": curve[1], "nelder_mead": {"fraction_of_best": {"median": 0.95}, "steps_to_85": {"median": None, "reached": 1}}}})
    at = app_test("training.py")
    assert not at.exception
    assert at.multiselect(key="t-quantities").value == ["fraction_of_best.median", "fraction_of_best.p5"]
    assert "fraction_of_best.median 0.97" in " ".join(c.value for c in at.caption)
    frames = [df.value for df in at.dataframe]
    assert set(frames[1]["method"]) == {"agent", "nelder_mead"} and "fraction_of_best.median" in frames[1]


def test_knob_chart_keeps_tesla_and_mrad_on_separate_axes():
    """An injector's solenoids (T) and steerers (mrad) get one panel each, with its own scale."""
    from controller.machines import list_machines
    from ui.console.charts import knob_chart

    machines = {m["name"]: m for m in list_machines()}
    spec = knob_chart(machines["sim-lpi"], [0.3, 0.3, 1.0, -1.0, 2.0, -2.0]).to_dict()
    assert spec["facet"]["column"]["field"] == "unit"
    assert spec["resolve"]["scale"]["y"] == "independent"
    rows = next(iter(spec["datasets"].values()))
    by_unit = {u: [r["knob"] for r in rows if r["unit"] == u] for u in {r["unit"] for r in rows}}
    assert by_unit == {"T": ["SOL1", "SOL2"], "mrad": ["ST1:H", "ST1:V", "ST2:H", "ST2:V"]}
    # the EPICS machine of an injector has the same units (from its lattice) as the simulated one
    assert [k["unit"] for k in machines["virtual-lpi"]["knobs"]] == [k["unit"] for k in machines["sim-lpi"]["knobs"]]

    orbit = knob_chart(machines["sim-cafe2-cm1"], None).to_dict()
    assert "facet" not in orbit and orbit["layer"][0]["encoding"]["y"]["title"] == "setting (simulator units)"


def test_proposals_and_knobs_are_shown_in_the_machine_files_units_largest_change_first():
    """A cryomodule's correctors in amperes with the machine file's scale and polarity
    (1.85 A per unit, vertical ones -1.85); simulator units on request; a setting at its
    limit is flagged."""
    from controller.machines import list_machines
    from ui.console.charts import knob_chart, proposal_table

    machine = {m["name"]: m for m in list_machines()}["virtual-cafe2-cm1"]
    names = [k["name"] for k in machine["knobs"]]
    current = [0.0] * len(names)
    proposed = [0.0] * len(names)
    proposed[0], proposed[1], proposed[2] = 0.3, 0.5, 20.0  # DCH1, DCV1, DCH2 (DCH2 at its 20-unit = 37 A limit)
    table = proposal_table(machine, {"names": names, "current": current, "proposed": proposed})
    assert list(table["knob"][:3]) == ["DCH2", "DCV1", "DCH1"] and set(table["unit"]) == {"A"}
    rows = table.set_index("knob")
    assert rows.loc["DCH1", "proposed"] == pytest.approx(0.555) and rows.loc["DCV1", "change"] == pytest.approx(-0.925)
    assert rows.loc["DCH2", "limit"] == "AT/NEAR LIMIT" and rows.loc["DCH1", "limit"] == ""
    assert rows.loc["DCH1", "of range"] == pytest.approx(0.555 / 74.0)
    raw = proposal_table(machine, {"names": names, "current": current, "proposed": proposed}, simulator_units=True)
    assert raw.set_index("knob").loc["DCV1", "proposed"] == pytest.approx(0.5)
    chart = knob_chart(machine, proposed).to_dict()
    assert chart["layer"][0]["encoding"]["y"]["title"] == "setting (A)"
    rows = next(iter(chart["datasets"].values()))
    assert rows[1]["setting"] == pytest.approx(-0.925) and (rows[1]["lower"], rows[1]["upper"]) == (-37.0, 37.0)


def test_a_bubble_session_draws_position_against_target_and_the_amplitudes(server):
    """The bubble's panels come from its task through the registry: an overlaid series
    (position and target on one chart) and the knobs' settings against the interval."""
    import json

    sid = run_session(server, machine="sim-dual-25-50khz", seed=3)
    session = httpx.get(f"{server}/api/sessions/{sid}").json()
    assert session["status"] in ("completed", "not_converged")
    at = app_test("history.py")
    assert not at.exception
    assert "Position and target" in texts(at) and "Amplitudes" in texts(at)
    charts = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    overlay = [c for c in charts if c.get("encoding", {}).get("color", {}).get("field") == "reading"]
    assert len(overlay) == 1 and overlay[0]["encoding"]["y"]["title"] == "x / lambda0 (x/lambda)"
    amplitudes = [c for c in charts if c.get("encoding", {}).get("color", {}).get("field") == "knob"
                  and c["encoding"].get("x", {}).get("field") == "step"]
    assert len(amplitudes) == 1 and amplitudes[0]["encoding"]["column"]["field"] == "unit"


def test_a_crop_session_draws_the_season_and_n_against_the_cap(server):
    """The crop's panels come from its task through the registry: crop state, N on one
    chart with the seasonal cap as a rule, and the applications (dose against the day)."""
    import json

    sid = run_session(server, machine="sim-wheat", seed=1)
    session = httpx.get(f"{server}/api/sessions/{sid}").json()
    assert session["status"] == "completed", session.get("trips")
    at = app_test("history.py")
    assert not at.exception
    assert all(title in texts(at) for title in ("Crop", "Biomass and grain", "Nitrogen", "Applications"))
    charts = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    capped = [c for c in charts if "layer" in c and any(layer.get("mark", {}).get("type") == "rule" for layer in c["layer"])]
    assert len(capped) == 1
    rule = next(layer for layer in capped[0]["layer"] if layer.get("mark", {}).get("type") == "rule")
    assert rule["encoding"]["y"] == {"datum": 250.0} and rule["encoding"]["tooltip"] == {"value": "seasonal N cap: 250"}
    # the run page's header says where the session left the field: the crop's safe state, verified
    run = app_test()
    run.selectbox(key="machine").set_value("sim-wheat").run()
    assert not run.exception
    assert "machine left: no fertiliser (dose 0) restored (verified by read-back)" in texts(run)


def test_the_header_tells_what_the_machine_was_left_at_and_the_headline_number():
    from core.outcome import machine_left
    from ui.console.charts import headline

    restore = {"kind": "restore", "reason": "starting settings restored in 3 writes (each within the largest step) and verified"}
    by_operator = {"kind": "restore", "reason": "starting settings restored by alice and verified"}
    failed = {"kind": "restore_failed", "reason": "connection lost during restore"}
    assert machine_left("aborted", [{"kind": "trip", "reason": "operator abort"}, restore]) == \
        "machine left: starting settings restored (verified by read-back)"
    assert machine_left("interrupted", [by_operator]) == "machine left: starting settings restored by alice (verified by read-back)"
    assert "RESTORE FAILED" in machine_left("tripped", [restore, failed]) and "press Restore" in machine_left("tripped", [failed])
    assert machine_left("interrupted", []) == "machine left: NOT restored — press Restore"
    assert machine_left("completed", []) == "machine left: at the session's final settings"
    assert machine_left("running", []) == "" and machine_left("dry-run", []) == "machine left: untouched (dry-run)"
    metric = {"name": "rms_mm", "unit": "mm", "label": "orbit RMS"}
    assert headline(metric, [{"step": 4, "metrics": {"rms_mm": 0.41234}}]) == "orbit RMS 0.4123 mm after step 4"
    assert headline(metric, []) == ""


def test_policies_are_offered_by_name_and_one_that_failed_its_bar_needs_confirmation(server, tmp_path):
    from controller.store import Store

    store = Store(f"sqlite:///{tmp_path / 'console.sqlite'}")
    meta = {"task": "orbit", "lattice": {"name": "cafe2-cm1"}}
    for trial, (success, rms) in {"001-cafe2-cm1-seed0": (1.0, 0.42), "002-cafe2-cm1-seed1": (0.0, 3.1)}.items():
        run = store.start_training_run(task="orbit", lattice="cafe2-cm1", errors="train", arch="tbsac", steps=600, seed=0,
                                       out_dir="x", sweep="nightly", trial=trial)
        best = {"success_rate": success, "steps": {"median": 5.0}, "final_rms_mm": {"p95": rms}, "beam_lost": 0}
        store.finish_training_run(run.id, "completed", {"best_step": 600, "best": best}, [dict(best, step=600)])
        store.add_policy(tmp_path / f"{trial}.pt", trial.ljust(64, "0")[:64], meta, training_run_id=run.id)
    at = app_test()
    at.selectbox(key="machine").select("sim-cafe2-cm1").run()
    box = at.selectbox(key="policy")
    labels = box.options  # as the operator reads them
    assert labels[0].startswith("pretrained")
    good = next(label for label in labels if label.startswith("nightly/001-cafe2-cm1-seed0"))
    bad = next(label for label in labels if label.startswith("nightly/002-cafe2-cm1-seed1"))
    assert "success_rate 1" in good and "bar met" in good and "FAILED" not in good
    assert "success_rate 0" in bad and "✗ FAILED its bar" in bad
    start = lambda: next(b for b in at.button if b.label == "Start")  # noqa: E731
    assert not start().disabled
    box.set_value(str((tmp_path / "002-cafe2-cm1-seed1.pt").resolve())).run()
    assert "did not meet the orbit bar" in texts(at)
    assert start().disabled  # until the operator confirms
    at.checkbox[0].check().run()
    assert not start().disabled


def test_dial_in_a_recorded_step_from_history_then_approve_it_on_the_run_page(server):
    sid = run_session(server, machine="sim-cafe2-cm1", seed=3)
    target = httpx.get(f"{server}/api/sessions/{sid}/steps").json()[1]["readbacks"]
    at = app_test("history.py")
    at.slider(key="h-step").set_value(2).run()
    at.button(key="h-dial-in").click().run()
    assert not at.exception
    dial = httpx.get(server + "/api/sessions").json()[0]
    assert dial["id"] != sid and dial["mode"] == "approve" and dial["machine"] == "sim-cafe2-cm1"
    at.switch_page(str(Path(APP).parent / "run.py"))  # where the browser goes by itself (AppTest stays put)
    for _ in range(40):  # the Run page: approve every write until the machine is there
        deadline = time.time() + 10
        while (state := httpx.get(f"{server}/api/sessions/{dial['id']}").json())["live"] and not state["pending"] \
                and time.time() < deadline:
            time.sleep(0.05)
        at.run()
        if not state["live"]:
            break
        assert "waiting for your approval" in texts(at) and f"Session {dial['id']}" in texts(at)
        assert "the opening probe" not in texts(at)  # a dial-in has none: each write goes to the recorded setting
        next(b for b in at.button if b.label == "Approve").click().run()
    at.run()
    assert f"machine left: at step 2 of session {sid} (dialled in, verified by read-back)" in texts(at)
    assert "the machine after the dial-in" in " ".join(c.value for c in at.caption)
    done = httpx.get(f"{server}/api/sessions/{dial['id']}/events").json()[-1]
    assert done["kind"] == "dial_in" and done["data"]["knobs"] == pytest.approx(target, abs=1e-6)


@pytest.mark.parametrize("machine", ["sim-cafe2-cm1", "sim-lpi", "sim-bess-1mw-2mwh", "sim-dual-25-50khz", "sim-wheat"])
def test_run_page_of_every_task_proposal_then_stop_and_the_restored_machine(server, machine):
    """Each registered task on the Run page in approve mode: its proposal (in its units,
    largest change first, with the model's expectation where the task has a model), its
    own panels and interlocks; Stop puts the machine in the task's safe state and the
    charts then draw the machine as restored, not as the last step left it."""
    from controller.machines import list_machines

    layout = {m["name"]: m for m in list_machines()}[machine]
    at = app_test()
    at.selectbox(key="machine").set_value(machine).run()
    at.radio(key="mode").set_value("approve").run()
    next(b for b in at.button if b.label == "Start").click().run()
    sid = httpx.get(server + "/api/sessions").json()[0]["id"]
    deadline = time.time() + 60
    while not httpx.get(f"{server}/api/sessions/{sid}").json()["pending"] and time.time() < deadline:
        time.sleep(0.05)
    at.run()
    assert not at.exception
    assert "Proposed step 1 — waiting for your approval" in texts(at)
    if layout["task"] == "orbit":  # the orbit task opens with a probe of the machine's response
        assert "the opening probe" in texts(at)
    proposal = at.dataframe[0].value
    assert list(proposal["knob"]) and set(proposal["knob"]) <= {k["name"] for k in layout["knobs"]}
    assert list(proposal["of range"].fillna(0)) == sorted(proposal["of range"].fillna(0), reverse=True)
    titles = {s.value for s in at.subheader}
    assert {p["title"] for p in layout["panels"]} <= titles and {"Knobs", "Interlocks"} <= titles
    assert all(il in texts(at) for il in layout["interlocks"])
    captions = " ".join(c.value for c in at.caption)
    if layout["task"] == "orbit":  # the task with a response model: the probe is not approved blind
        assert "Expected effect (the policy's model of its lattice): orbit RMS" in captions
    next(b for b in at.button if b.label == "Stop").click().run()
    deadline = time.time() + 60
    while httpx.get(f"{server}/api/sessions/{sid}").json()["live"] and time.time() < deadline:
        time.sleep(0.05)
    at.run()
    assert not at.exception
    assert f"Session {sid} · aborted" in texts(at) and "restored (verified by read-back)" in texts(at)
    assert "the machine after the restore" in " ".join(c.value for c in at.caption)


def test_the_reward_axis_is_not_flattened_by_a_success_bonus():
    from ui.console.charts import trend_chart

    steps = [{"step": k, "reward": r, "metrics": {"rms_mm": 1.0 / k}} for k, r in enumerate([-0.8, -0.4, -0.1, 10.0], 1)]
    spec = trend_chart(steps, {"name": "rms_mm", "unit": "mm", "label": "orbit RMS"}).to_dict()
    reward = spec["hconcat"][1]["encoding"]
    assert reward["y"]["scale"] == {"type": "symlog"} and reward["x"]["axis"] == {"tickMinStep": 1}
