"""Fuzzing the loaders of machine files and policy files (hypothesis, about a minute in all):
whatever the input, the answer is a one-line ConfigError (exit 2 on the command line),
never another exception, never a hang."""

import copy
import io
import os
import subprocess

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tbsac_cmd
from controller.machines import open_machine
from controller.policy import POLICY_DIR, Policy
from core.config import ConfigError
from hardware.machine import MACHINE_DIR

GOOD_MACHINE = yaml.safe_load((MACHINE_DIR / "virtual-cafe2-cm1.yaml").read_text())
GOOD_POLICY = torch.load(POLICY_DIR / "cafe2-cm1.pt", weights_only=True)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def paths_of(node, prefix=()):
    """Every (path, value) in a nested dict/list."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, prefix + (i,))


@st.composite
def mutated(draw, good):
    """`good` with a few leaves replaced, keys dropped or added."""
    data = copy.deepcopy(good)
    for _ in range(draw(st.integers(1, 4))):
        places = [p for p, _ in paths_of(data) if p]
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return data


def only_config_errors(load):
    try:
        load()
    except ConfigError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


@FUZZ
@given(mutated(GOOD_MACHINE))
def test_machine_files_fail_only_with_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("m") / "machine.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    only_config_errors(lambda: open_machine(str(path), connect=False))


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400)))
def test_random_bytes_as_machine_files(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("m") / "machine.yaml"
    (path.write_bytes if isinstance(blob, bytes) else path.write_text)(blob)
    only_config_errors(lambda: open_machine(str(path), connect=False))


@st.composite
def mutated_policies(draw):
    blob = {"metadata": draw(mutated(GOOD_POLICY["metadata"])), "actor": dict(GOOD_POLICY["actor"])}
    names = sorted(blob["actor"])
    change = draw(st.sampled_from(["none", "drop", "shape", "extra", "not-a-tensor"]))
    victim = draw(st.sampled_from(names))
    if change == "drop":
        del blob["actor"][victim]
    elif change == "shape":
        blob["actor"][victim] = torch.zeros(draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    elif change == "extra":
        blob["actor"]["surprise.weight"] = torch.zeros(2)
    elif change == "not-a-tensor":
        blob["actor"][victim] = draw(st.integers())
    return blob


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated_policies())
def test_policy_files_fail_only_with_config_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("p") / "policy.pt"
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    path.write_bytes(buffer.getvalue())
    only_config_errors(lambda: Policy.load(path))


NASTY = {
    "over-1MB": b"name: x\n" + b"# padding\n" * 120_000,
    "binary": bytes(range(256)) * 8,
    "10000-digit-integer": b"name: x\nconnection_timeout_s: " + b"9" * 10_000 + b"\n",
    "100k-nested-brackets": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_machine_files_exit_2_with_one_line(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(NASTY[name])
    proc = subprocess.run([*tbsac_cmd(), "run", "--machine", str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TBSAC_DATA_DIR": str(tmp_path)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(path) in lines[0], proc.stderr[-500:]


@pytest.mark.parametrize("edit", ["shapes", "missing-observation", "unknown-architecture"])
def test_bad_policy_files_exit_2_with_one_line(tmp_path, edit):
    blob = copy.deepcopy(GOOD_POLICY)
    if edit == "shapes":
        first = next(iter(blob["actor"]))
        blob["actor"][first] = torch.zeros(7, 7)
    elif edit == "missing-observation":
        del blob["metadata"]["observation"]
    else:
        blob["metadata"]["arch"] = "transformer"
    path = tmp_path / "p.pt"
    torch.save(blob, path)
    proc = subprocess.run([*tbsac_cmd(), "evaluate", "orbit", "--policy", str(path), "--episodes", "1", "--json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TBSAC_DATA_DIR": str(tmp_path)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(path) in lines[0], proc.stderr[-500:]
