"""Session-store and control-server benchmarks.

    python benchmarks/server.py [--out benchmarks/results]

1. Store overhead per step: median time to commit one step row (SQLite file, WAL).
2. Control-loop slowdown under load: a `tbsac serve` process runs sessions (each in a
   process of its own) against a virtual IOC (magnet ramp 0) while concurrent clients
   read the API (50 polling once a second like consoles; 20 flat out); the p50 and p95
   of the time between consecutive steps are compared with and without the readers,
   in the same run. Target: p95 ratio <= 1.5 with 20 readers flat out.

Writes ``server.json`` and ``server.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import numpy as np

TOKEN = "bench"


def store_overhead(tmp: Path, steps: int = 500) -> dict:
    from controller.machines import open_machine
    from controller.policy import Policy
    from controller.recording import SessionRecorder
    from controller.session import StepRecord
    from controller.store import Store

    store = Store(f"sqlite:///{tmp / 'bench.sqlite'}")
    machine = open_machine("sim-cafe2-cm1")
    policy = Policy.load("pretrained", machine.definition, machine.setup)
    recorder = SessionRecorder(store, machine.record, policy, "bench", "auto", None, machine.plant)
    rng = np.random.default_rng(0)
    times = []
    for k in range(steps):
        record = StepRecord(k + 1, rng.normal(size=30).tolist(), rng.uniform(-1, 1, 10).tolist(), rng.normal(size=10).tolist(),
                            rng.normal(size=10).tolist(), rng.normal(size=10).tolist(), rng.normal(size=10).tolist(),
                            {"beam_current": 10.0, "mps_ok": 1.0}, -1.0, {"rms_mm": 0.7}, 0.01, time.time())
        t = time.perf_counter()
        recorder.on_step(record)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {"steps": steps, "median_ms": round(float(np.median(ms)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def loop_under_load(tmp: Path, sessions: int = 12, readers: int = 20, poll_interval_s: float = 0.0) -> dict:
    """`readers` concurrent clients, each polling every `poll_interval_s` (0: flat out)."""
    from hardware.ioc import free_port, loopback_environment, start_virtual_ioc

    tmp.mkdir(parents=True, exist_ok=True)
    ca_port, http_port = free_port(), free_port()
    env = {**os.environ, **loopback_environment(ca_port), "TBSAC_DATA_DIR": str(tmp / "data"),
           "TBSAC_DATABASE_URL": f"sqlite:///{tmp / 'srv.sqlite'}"}
    ioc = start_virtual_ioc("cafe2-cm1", 1, "test", ca_port, 0.0, env=env)
    server = subprocess.Popen([sys.executable, "-m", "ui.cli", "serve", "--port", str(http_port)],
                              env={**env, "TBSAC_OPERATOR_TOKEN": TOKEN}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for _ in range(300):
            try:
                httpx.get(f"{base}/api/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)

        def run_sessions() -> list[float]:
            gaps = []
            for _ in range(sessions):
                r = httpx.post(f"{base}/api/sessions", json={"machine": "virtual-cafe2-cm1", "operator": "bench"}, headers=auth, timeout=30)
                sid = r.json()["session"]
                while httpx.get(f"{base}/api/sessions/{sid}", timeout=30).json()["live"]:
                    time.sleep(0.05)
                steps = httpx.get(f"{base}/api/sessions/{sid}/steps", timeout=30).json()
                stamps = [datetime.fromisoformat(s["time"]).timestamp() for s in steps]
                gaps += list(np.diff(stamps))
                # Back to the mis-steered start, so every session has the same work to do.
                httpx.post(f"{base}/api/sessions/{sid}/restore", headers=auth, timeout=30)
            return gaps

        quiet = run_sessions()
        stop = threading.Event()
        reads = [0]

        def reader() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    c.get("/api/sessions")
                    latest = c.get("/api/sessions", params={"limit": 1}).json()
                    if latest:
                        c.get(f"/api/sessions/{latest[0]['id']}/steps")
                    reads[0] += 3
                    if poll_interval_s:
                        stop.wait(poll_interval_s)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        loaded = run_sessions()
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        server.terminate()
        ioc.terminate()
        server.wait(10)
        ioc.wait(10)
    q, l = np.array(quiet) * 1e3, np.array(loaded) * 1e3
    pct = {name: {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2)}
           for name, a in (("quiet_step_ms", q), ("loaded_step_ms", l))}
    return {"readers": readers, "poll_interval_s": poll_interval_s, "reads_per_s": round(reads[0] / elapsed, 1), **pct,
            "p50_ratio": round(pct["loaded_step_ms"]["p50"] / pct["quiet_step_ms"]["p50"], 3),
            "p95_ratio": round(pct["loaded_step_ms"]["p95"] / pct["quiet_step_ms"]["p95"], 3),
            "steps_quiet": len(quiet), "steps_loaded": len(loaded)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with TemporaryDirectory() as tmp:
        report = {
            "store_overhead_sqlite": store_overhead(Path(tmp)),
            # 50 consoles refreshing once a second, as the console does...
            "loop_under_console_load": loop_under_load(Path(tmp) / "a", readers=50, poll_interval_s=1.0),
            # ...and 20 clients reading as fast as they can (the acceptance: p95 ratio <= 1.5).
            "loop_under_flat_out_load": loop_under_load(Path(tmp) / "b", readers=20, poll_interval_s=0.0),
        }
    print(json.dumps(report))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(report, indent=2))
    s = report["store_overhead_sqlite"]
    lines = ["# Store and server benchmarks", "",
             f"Store overhead per step (SQLite, WAL): median {s['median_ms']} ms, p95 {s['p95_ms']} ms over {s['steps']} steps.", ""]
    for key in ("loop_under_console_load", "loop_under_flat_out_load"):
        l = report[key]
        lines.append(f"Control loop (a session process of its own) with {l['readers']} concurrent API readers polling every "
                     f"{l['poll_interval_s']} s ({l['reads_per_s']} reads/s): time between steps p50/p95 "
                     f"{l['quiet_step_ms']['p50']}/{l['quiet_step_ms']['p95']} ms alone, "
                     f"{l['loaded_step_ms']['p50']}/{l['loaded_step_ms']['p95']} ms under load "
                     f"(ratio p50 {l['p50_ratio']}, p95 {l['p95_ratio']}).")
    (args.out / "server.md").write_text("\n".join(lines) + "\n")
    print(f"written {args.out / 'server.json'} and {args.out / 'server.md'}")


if __name__ == "__main__":
    main()
