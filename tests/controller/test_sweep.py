"""Sweeps and split evaluations on Ray (local Ray on this machine, the real `tbsac` command)."""

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import _postgres_database, tbsac_cmd

pytest.importorskip("ray", reason="the cluster extra (pip install -e '.[cluster]'; .ci/run installs it)")

# Tiny trials: two periodic evaluations of two machines each, then a two-machine evaluation.
TINY = {"train": {"steps": 600, "eval_every": 300, "eval_episodes": 2},
        "evaluate": {"episodes": 2, "methods": ["svd_model"]}}


def write_sweep(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "task": "orbit", **TINY, **fields}))
    return path


def renamed_lattice(tmp_path: Path, name: str) -> Path:
    """A copy of the shipped cafe2-cm1 lattice under another name (its own 'pretrained' slot)."""
    from simulators.beamline.lattice import LATTICE_DIR

    content = yaml.safe_load((Path(str(LATTICE_DIR)) / "cafe2-cm1.yaml").read_text())
    content["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def open_store(url: str | None = None):
    from controller.store import Store

    return Store(url or f"sqlite:///{Path(os.environ['TBSAC_DATA_DIR']) / 'tbsac.sqlite'}")


def test_four_trial_sweep_records_runs_with_curves_policies_and_evaluations(run_cli, tmp_path):
    from controller.policy import POLICY_DIR
    from controller.store import EvaluationRow, PolicyRow, TrainingRunRow

    name = f"sweeptest{os.getpid()}"
    lattice = renamed_lattice(tmp_path, name)
    sweep = write_sweep(tmp_path, f"four-{os.getpid()}", lattices=["cafe2-cm1", str(lattice)], seeds=[0, 1])
    proc = run_cli("sweep", str(sweep), "--out", str(tmp_path / "trials"), "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [t["status"] for t in report["trials"]] == ["completed"] * 4
    assert "step 300" in proc.stderr and "step 600" in proc.stderr  # live progress, per periodic evaluation

    store = open_store()
    runs = store.list(TrainingRunRow, TrainingRunRow.sweep == report["sweep"])
    assert len(runs) == 4 and {r.status for r in runs} == {"completed"}
    assert sorted((r.lattice, r.seed) for r in runs) == sorted((lat, s) for lat in ("cafe2-cm1", name) for s in (0, 1))
    assert sorted(r.trial for r in runs) == sorted(t["trial"] for t in report["trials"])
    for run in runs:
        assert [c["step"] for c in run.curves] == [300, 600]
        assert "success_rate" in run.curves[0] and run.evaluation["best_step"] in (300, 600)
        policy = store.list(PolicyRow, PolicyRow.training_run_id == run.id)
        assert len(policy) == 1
        content = store.policy_content(policy[0].id)
        assert hashlib.sha256(content).hexdigest() == policy[0].sha256  # the file's bytes are in the store
        assert Path(policy[0].path).read_bytes() == content
        evaluations = store.list(EvaluationRow, EvaluationRow.policy_id == policy[0].id)
        assert evaluations and set(evaluations[-1].results) == {"agent", "svd_model"}
        assert evaluations[-1].episodes == 2

    # Promotion: tiny trials do not meet the orbit bar, so it needs --force; the shipped
    # cafe2-cm1 policy stays untouched when refused.
    shipped = (POLICY_DIR / "cafe2-cm1.pt").read_bytes()
    refused = run_cli("promote", "--sweep", report["sweep"], "--lattice", "cafe2-cm1")
    assert refused.returncode == 2 and "did not meet the orbit bar" in refused.stderr
    assert (POLICY_DIR / "cafe2-cm1.pt").read_bytes() == shipped
    target = POLICY_DIR / f"{name}.pt"
    try:
        promoted = run_cli("promote", "--sweep", report["sweep"], "--lattice", name, "--force")
        assert promoted.returncode == 0, promoted.stderr
        best = max((r for r in runs if r.lattice == name), key=lambda r: (r.evaluation["best"]["success_rate"],
                                                                          -r.evaluation["best"]["steps"]["median"],
                                                                          -(r.evaluation["best"]["final_rms_mm"]["p95"] or 1e9)))
        assert f"run {best.id} " in promoted.stdout
        policy = store.list(PolicyRow, PolicyRow.training_run_id == best.id)[0]
        assert hashlib.sha256(target.read_bytes()).hexdigest() == policy.sha256
        # ... and `pretrained` on that lattice is now the promoted policy
        evaluated = run_cli("evaluate", "orbit", "--lattice", str(lattice), "--policy", "pretrained", "-n", "1",
                            "--methods", "", "--json")
        assert evaluated.returncode == 0, evaluated.stderr
    finally:
        target.unlink(missing_ok=True)
    store.engine.dispose()


def test_a_failing_trial_is_retried_once_and_reported(run_cli, tmp_path):
    from controller.store import TrainingRunRow

    sweep = write_sweep(tmp_path, f"failing-{os.getpid()}", hyperparameters={"learning_rate": [-1.0]})
    proc = run_cli("sweep", str(sweep), "--out", str(tmp_path / "trials"), timeout=600)
    assert proc.returncode == 1
    assert "retrying once" in proc.stderr
    assert "failed after one retry" in proc.stderr and "Invalid learning rate: -1.0" in proc.stderr
    runs = open_store().list(TrainingRunRow, TrainingRunRow.sweep == f"failing-{os.getpid()}")
    assert [r.status for r in runs] == ["failed", "failed"]  # the first attempt and its one retry


@pytest.mark.slow  # 35 s; CI runs it (with its PostgreSQL) after the default suite
def test_two_sweeps_write_one_postgresql_store_concurrently(tmp_path):
    from controller.store import PolicyRow, TrainingRunRow

    url, drop = _postgres_database()
    try:
        env = {**os.environ, "TBSAC_DATABASE_URL": url}
        procs = []
        for engineer, lattice in (("alice", "cafe2-cm1"), ("bob", "cafe2-cm2")):
            sweep = write_sweep(tmp_path, f"{engineer}-{os.getpid()}", lattices=[lattice], seeds=[0, 1],
                                resources={"cpus": 1, "memory_gb": 1})
            procs.append(subprocess.Popen([*tbsac_cmd(), "sweep", str(sweep), "--out", str(tmp_path / engineer),
                                           "--max-concurrent", "1", "--json"],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        outputs = [p.communicate(timeout=600) for p in procs]
        for proc, (out, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-3000:]
        store = open_store(url)
        for engineer, lattice in (("alice", "cafe2-cm1"), ("bob", "cafe2-cm2")):
            runs = store.list(TrainingRunRow, TrainingRunRow.sweep == f"{engineer}-{os.getpid()}")
            assert len(runs) == 2 and {r.lattice for r in runs} == {lattice} and {r.status for r in runs} == {"completed"}
            assert all(len(r.curves) == 2 and store.list(PolicyRow, PolicyRow.training_run_id == r.id) for r in runs)
        store.engine.dispose()
    finally:
        drop()


# Orbit in the default run; the other tasks (20-40 s each) with the long checks.
@pytest.mark.parametrize("task, args", [
    ("orbit", ["-n", "4"]),
    pytest.param("rfq", ["-n", "2", "--budget", "5"], marks=pytest.mark.slow),  # every baseline, Xopt's BO included
    pytest.param("battery", ["-n", "3"], marks=pytest.mark.slow),  # agent, LP ceiling, MPC, threshold, nothing
    pytest.param("crop", ["-n", "3", "--methods", "none,expert,best_fixed"], marks=pytest.mark.slow),  # (no hindsight)
    pytest.param("bubble", ["-n", "3"], marks=pytest.mark.slow),  # TBSAC, DDPG, greedy, linear theory (a batch per part)
])
def test_an_evaluation_split_over_workers_equals_the_serial_one(run_cli, task, args):
    serial = run_cli("evaluate", task, *args, "--json")
    split = run_cli("evaluate", task, *args, "--json", "--workers", "2")
    assert serial.returncode == 0 and split.returncode == 0, serial.stderr[-2000:] + split.stderr[-2000:]
    assert json.loads(split.stdout) == json.loads(serial.stdout)


def test_a_task_that_does_not_split_says_so(monkeypatch):
    import sys

    from controller.cluster import evaluate_on_workers
    from core.config import ConfigError

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "toy"))  # a task that only overrides evaluate
    from thermal import ThermalDefinition

    assert "thermal" in sys.modules and not ThermalDefinition().splits_evaluation
    with pytest.raises(ConfigError, match="task thermal does not split its evaluation"):
        evaluate_on_workers(ThermalDefinition(), None, None, None, 4, 0, (), None, workers=2)


@pytest.mark.parametrize("content, message", [
    ({"name": "x", "task": "orbit", "hyperparameters": {"learning_rat": [1e-3]}}, "unknown hyperparameter 'learning_rat'"),
    ({"name": "x", "task": "orbits"}, "unknown task 'orbits'"),
    ({"name": "x", "task": "orbit", "lattices": ["cafe2-cm9"]}, "cafe2-cm9"),
    ({"name": "x y", "task": "orbit"}, "name"),
    ({"name": "x", "task": "orbit", "seeds": []}, "seeds"),
    ({"name": "x", "task": "orbit", "hyperparameters": {"arch": ["transformer"]}}, "arch"),
    ({"name": "x", "task": "orbit", "evaluate": {"methods": ["gradient_descent"]}}, "gradient_descent"),
])
def test_a_bad_sweep_file_is_refused_naming_the_field(tmp_path, content, message):
    from controller.sweep import load_sweep
    from core.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message.replace("'", ".").replace("[", ".")):
        load_sweep(path)


def test_the_sweep_command_refuses_a_bad_file_before_ray_starts(run_cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntask: orbit\nseeds: [0, 1\n")  # malformed YAML
    proc = run_cli("sweep", str(path))
    assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr


def test_without_ray_the_commands_say_how_to_install_it(run_cli, tmp_path):
    # A `ray` package that cannot be imported, first on the path: as on a machine without the extra.
    (tmp_path / "noray" / "ray").mkdir(parents=True)
    (tmp_path / "noray" / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    sweep = write_sweep(tmp_path, "noray")
    env = {"PYTHONPATH": str(tmp_path / "noray")}
    for args in (["sweep", str(sweep)], ["evaluate", "orbit", "-n", "2", "--workers", "2"]):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "pip install -e '.[cluster]'" in proc.stderr


def test_the_documented_sweep_files_are_valid():
    from controller.sweep import load_sweep, trials

    files = sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        sweep = load_sweep(path)
        grid = math.prod(len(v) for v in sweep.hyperparameters.values())
        assert len(trials(sweep)) == len(sweep.lattices or [None]) * len(sweep.errors) * len(sweep.seeds) * grid


def _head_client_server_logs() -> str:
    """The head's logs of the servers it spawned for Ray Clients (why a connection failed)."""
    from pathlib import Path

    logs = sorted(Path("/tmp/ray/session_latest/logs").glob("ray_client_server*.err"))
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in logs)


@pytest.mark.slow  # starts a Ray "cluster" (a head node on loopback) beside the test's own processes
def test_the_same_sweep_file_runs_against_a_cluster_address(run_cli, tmp_path):
    import shutil

    from controller.store import TrainingRunRow
    from hardware.ioc import free_port

    ray_cmd = shutil.which("ray")
    assert ray_cmd, "the cluster extra installs the `ray` command"
    port, client_port = free_port(), free_port()
    # The cluster's token, shared by its nodes and whoever submits to it (Ray's token authentication)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = subprocess.run([ray_cmd, "start", "--head", f"--port={port}", f"--ray-client-server-port={client_port}",
                           "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                          capture_output=True, text=True, timeout=180,
                          # Ray's client proxy gives the server it starts per client 30 s to answer; on a busy
                          # 2-core CI box that server once took longer (the sweep failed at connecting)
                          env={**os.environ, **auth, "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"})
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        sweep = write_sweep(tmp_path, f"cluster-{os.getpid()}", seeds=[0, 1])
        proc = run_cli("sweep", str(sweep), "--address", f"ray://127.0.0.1:{client_port}", "--out", str(tmp_path / "trials"),
                       "--json", timeout=600, env=auth)
        assert proc.returncode == 0, proc.stderr[-3000:] + _head_client_server_logs()
        assert proc.stdout.startswith("{"), proc.stdout[:3000]
        assert [t["status"] for t in json.loads(proc.stdout)["trials"]] == ["completed"] * 2
        runs = open_store().list(TrainingRunRow, TrainingRunRow.sweep == f"cluster-{os.getpid()}")
        assert len(runs) == 2 and all(len(r.curves) == 2 for r in runs)
    finally:
        subprocess.run([ray_cmd, "stop", "--force"], capture_output=True, timeout=120)


def test_an_address_where_no_ray_head_answers_is_refused_at_once(run_cli, tmp_path):
    from hardware.ioc import free_port

    sweep = write_sweep(tmp_path, "nohead")
    for args in (["sweep", str(sweep)], ["evaluate", "orbit", "-n", "2"]):
        proc = run_cli(*args, "--address", f"ray://127.0.0.1:{free_port()}", timeout=120)
        assert proc.returncode == 2 and "nothing answers at ray://127.0.0.1:" in proc.stderr, proc.stderr[-2000:]


class _HeadThatFailsToSpawn:
    """Stands in for `ray` only where a real head cannot be made to fail on demand: its
    first `failures` connections die as a loaded head's client-server spawn does."""

    def __init__(self, failures: int, message: str = "Initialization failure from server: RuntimeError: "
                                                        "Starting Ray client server failed. See ray_client_server_23000.err"):
        self.failures, self.message, self.calls = failures, message, 0

    def init(self, address, **options):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionAbortedError(self.message)


@pytest.mark.parametrize("failures, connects", [(1, True), (2, True), (3, False)])
def test_a_client_server_that_fails_to_spawn_is_asked_for_again(monkeypatch, failures, connects):
    from controller import cluster

    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    head = _HeadThatFailsToSpawn(failures)
    if connects:
        cluster._connect(head, "ray://127.0.0.1:1", {})
    else:
        with pytest.raises(ConnectionAbortedError, match="Starting Ray client server failed"):
            cluster._connect(head, "ray://127.0.0.1:1", {})
    assert head.calls == min(failures + 1, cluster.CONNECT_ATTEMPTS)


def test_any_other_connection_failure_is_reported_at_once(monkeypatch):
    from controller import cluster

    head = _HeadThatFailsToSpawn(1, message="Initialization failure from server: version mismatch")
    with pytest.raises(ConnectionAbortedError, match="version mismatch"):
        cluster._connect(head, "ray://127.0.0.1:1", {})
    assert head.calls == 1
