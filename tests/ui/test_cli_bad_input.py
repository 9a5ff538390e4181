"""User errors exit with code 2 and one line naming the file and field, no traceback."""

import numpy as np
import pytest

from controller.agents import make_sac
from controller.policy import Policy
from controller.training import policy_metadata
from core.registry import get_task
from simulators.beamline.errors import load_error_model
from simulators.beamline.lattice import LATTICE_DIR, load_lattice
from simulators.beamline.task import OrbitEnv, OrbitTaskConfig
from conftest import for_setup

GOOD = (LATTICE_DIR / "cafe2-cm1.yaml").read_text()


def assert_user_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "text, needles",
    [
        (GOOD.replace("elements:", "elements: [unclosed"), ["malformed YAML", "line"]),
        (GOOD.replace("type: bpm, name: BPM2", "type: wiggler, name: BPM2"), ["elements[", "wiggler"]),
        (GOOD.replace("{type: drift, name: D3, length: 0.085}", "{type: drift, name: D3, length: -0.085}"),
         ["elements[", "(D3).length", "greater than or equal to 0"]),
        (GOOD.replace("kinetic_energy_per_nucleon_mev: 1.356\n", ""), ["kinetic_energy_per_nucleon_mev", "required"]),
    ],
    ids=["malformed-yaml", "unknown-element", "negative-length", "missing-field"],
)
def test_bad_lattice_file(tmp_path, run_cli, text, needles):
    bad = tmp_path / "bad-lattice.yaml"
    bad.write_text(text)
    proc = run_cli("evaluate", "orbit", "--lattice", str(bad), "--episodes", "1", "--json")
    assert_user_error(proc, str(bad), *needles)


def test_unknown_shipped_lattice(run_cli):
    assert_user_error(run_cli("evaluate", "orbit", "--lattice", "cafe9", "--json"), "cafe9", "cafe2-cm1")


def test_bad_error_model_file(tmp_path, run_cli):
    bad = tmp_path / "errors.yaml"
    bad.write_text("solenoid_misalignment_mm: lots\n")
    assert_user_error(run_cli("evaluate", "orbit", "--errors", str(bad), "--json"), str(bad), "solenoid_misalignment_mm")


def _untrained_policy(lattice_name: str, path):
    lattice = load_lattice(lattice_name)
    em = load_error_model("train")
    model = make_sac(OrbitEnv(lattice, em), seed=0)
    meta = policy_metadata(get_task("orbit"), lattice, em, OrbitTaskConfig(), "tbsac", {"steps": 0, "seed": 0})
    return Policy.from_sac(model.policy, meta).save(path)


def test_policy_for_other_bpm_count_is_refused(tmp_path, run_cli):
    policy = _untrained_policy("cafe2-cm1", tmp_path / "cm1.pt")
    proc = run_cli("evaluate", "orbit", "--lattice", "cafe2-cm2", "--policy", str(policy), "--json")
    assert_user_error(proc, str(policy), "metadata.lattice.n_bpm", "5 BPMs", "has 4")


def test_policy_file_roundtrip_keeps_actions(tmp_path):
    lattice = load_lattice("cafe2-cm2")
    path = _untrained_policy("cafe2-cm2", tmp_path / "cm2.pt")
    loaded = Policy.load(path, *for_setup(lattice))
    again = Policy.load(path, *for_setup(lattice))
    obs = np.random.default_rng(0).normal(size=(5, 3 * lattice.n_readings)).astype(np.float32)
    np.testing.assert_array_equal(loaded.act(obs), again.act(obs))
    assert loaded.metadata["lattice"]["n_bpm"] == 4
    assert loaded.metadata["versions"]["torch"].startswith("2.13.0")


def test_not_a_policy_file(tmp_path, run_cli):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    assert_user_error(run_cli("evaluate", "orbit", "--policy", str(junk), "--json"), str(junk))


def test_unknown_architecture(tmp_path, run_cli):
    proc = run_cli("train", "orbit", "--arch", "transformer", "--out", str(tmp_path))
    assert_user_error(proc, "--arch", "transformer")


@pytest.mark.parametrize("setting, named", [("nope=1", "nope"), ("base", "KEY=VALUE"), ("base=mpcx", "base")])
def test_a_bad_task_setting_is_named_before_training(tmp_path, run_cli, setting, named):
    proc = run_cli("train", "battery", "--set", setting, "--steps", "1000", "--out", str(tmp_path / "run"))
    assert_user_error(proc, named)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_ddpg_with_the_batterys_privileged_critics_is_refused_naming_the_way_out(tmp_path, run_cli):
    proc = run_cli("train", "battery", "--algo", "ddpg", "--steps", "1000", "--out", str(tmp_path / "run"))
    assert_user_error(proc, "--algo ddpg", "--plain-critic")
    assert not (tmp_path / "run").exists()
