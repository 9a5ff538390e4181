"""The `tbsac` command line end to end (real subprocesses)."""

import json

import pytest

from controller.policy import Policy
from simulators.beamline.lattice import load_lattice
from conftest import for_setup


def test_evaluate_json_schema(run_cli):
    proc = run_cli("evaluate", "orbit", "--lattice", "cafe2-cm2", "--policy", "pretrained",
                   "--episodes", "3", "--seed", "1000", "--errors", "test", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert {k: out[k] for k in ("task", "lattice", "errors", "episodes", "seed")} == {
        "task": "orbit", "lattice": "cafe2-cm2", "errors": "test", "episodes": 3, "seed": 1000}
    assert set(out["results"]) == {"agent", "svd_model", "svd_measured", "nothing"}
    for r in out["results"].values():
        assert 0.0 <= r["success_rate"] <= 1.0
        assert set(r["final_rms_mm"]) == {"median", "p95"}
        assert set(r["steps"]) == {"median", "p95"}
        assert r["initial_rms_mm"]["median"] > 0.5


def test_evaluate_table_and_plot_with_lattice_path(run_cli, tmp_path):
    from simulators.beamline.lattice import LATTICE_DIR

    lattice_file = tmp_path / "cm1-copy.yaml"
    lattice_file.write_text((LATTICE_DIR / "cafe2-cm1.yaml").read_text())
    policy = Policy.load("pretrained", *for_setup(load_lattice("cafe2-cm1"))).path
    plot = tmp_path / "eval.png"
    proc = run_cli("evaluate", "orbit", "--lattice", str(lattice_file), "--policy", str(policy),
                   "--episodes", "2", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    assert "svd_measured" in proc.stdout and "success" in proc.stdout
    assert plot.stat().st_size > 10_000


def test_demo_runs_and_writes_plot(run_cli, tmp_path):
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "agent" in proc.stdout and "svd_model" in proc.stdout
    assert (tmp_path / "tbsac-demo.png").stat().st_size > 10_000


def test_info_lists_shipped_things(run_cli):
    proc = run_cli("info")
    assert proc.returncode == 0
    for name in ("cafe2-cm1", "cafe2-cm2", "cafe2-cm3", "train", "test", "hard", "cafe2-cm1.pt"):
        assert name in proc.stdout


@pytest.mark.slow  # 19 s; training runs by default in test_seam.py and the fine-tuning test
def test_short_training_writes_policy_checkpoints_and_logs(run_cli, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "orbit", "--lattice", "cafe2-cm2", "--steps", "1000", "--seed", "3",
                   "--out", str(out), "--eval-every", "500", "--eval-episodes", "3", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "policy.pt").is_file() and (out / "sac_model.zip").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000500.pt", "step_0001000.pt"]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    record = json.loads((out / "training.json").read_text())
    assert [c["step"] for c in record["curves"]] == [500, 1000]
    policy = Policy.load(out / "policy.pt", *for_setup(load_lattice("cafe2-cm2")))
    meta = policy.metadata
    assert meta["lattice"]["name"] == "cafe2-cm2" and meta["error_model"]["name"] == "train"
    assert meta["observation"]["size"] == 24 and meta["training"]["seed"] == 3
    assert (out / "policy.pt").stat().st_size < 1_000_000
    with pytest.raises(Exception, match="metadata.lattice.n_bpm"):
        Policy.load(out / "policy.pt", *for_setup(load_lattice("cafe2-cm1")))
