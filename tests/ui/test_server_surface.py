"""The control server's surface (issue 13, item 8): binding, token, hosts, paths."""

import subprocess

import pytest
from fastapi.testclient import TestClient

from conftest import _free_port, tbsac_cmd, wait_http

TOKEN = "surface-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path, monkeypatch):
    from controller.store import Store
    from ui.server import create_app

    monkeypatch.setenv("TBSAC_DATA_DIR", str(tmp_path / "data"))
    with TestClient(create_app(Store(f"sqlite:///{tmp_path / 's.sqlite'}"), TOKEN, machine_dirs=[tmp_path / "machines"]),
                    base_url="http://127.0.0.1") as c:
        yield c


def test_binding_beyond_loopback_needs_an_explicit_token(tmp_path):
    env = {"TBSAC_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    proc = subprocess.run([*tbsac_cmd(), "serve", "--host", "0.0.0.0", "--port", str(_free_port())], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env, "TBSAC_OPERATOR_TOKEN": ""})
    assert proc.returncode == 2 and "explicit operator token" in proc.stderr


def test_the_token_can_come_from_a_file(tmp_path):
    import os

    import httpx

    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    port = _free_port()
    server = subprocess.Popen([*tbsac_cmd(), "serve", "--port", str(port), "--token-file", str(token_file)],
                              env={**os.environ, "TBSAC_DATA_DIR": str(tmp_path), "TBSAC_OPERATOR_TOKEN": "",
                                   "TBSAC_DATABASE_URL": f"sqlite:///{tmp_path / 't.sqlite'}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/health")
        body = {"operator": "x"}
        assert httpx.post(url + "/api/sessions/1/pause", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert httpx.post(url + "/api/sessions/1/pause", json=body, headers={"Authorization": "Bearer from-a-file"}).status_code == 404
    finally:
        server.terminate()
        server.wait(10)


def test_requests_for_other_hosts_are_refused(client):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not reach the API."""
    assert client.get("/api/health", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/health").status_code == 200


def test_health_reveals_no_paths(client):
    body = client.get("/api/health").text
    assert "/" not in body.replace("\\/", "") and "sqlite" in body


@pytest.mark.parametrize("machine, policy, needle", [
    ("/etc/passwd", "pretrained", "machine"),
    ("../../x", "pretrained", "machine"),
    ("sim-cafe2-cm1", "/etc/passwd", "policy"),
    ("sim-cafe2-cm1", "../../../tmp/evil.pt", "policy"),
])
def test_machine_and_policy_paths_are_confined(client, machine, policy, needle):
    r = client.post("/api/sessions", json={"machine": machine, "policy": policy, "operator": "eve"}, headers=AUTH)
    assert r.status_code == 403 and needle in r.json()["detail"]


def test_a_machine_name_cannot_escape_the_data_directory(client, tmp_path):
    import yaml

    from hardware.machine import MACHINE_DIR

    folder = tmp_path / "machines"
    folder.mkdir()
    data = yaml.safe_load((MACHINE_DIR / "virtual-cafe2-cm1.yaml").read_text())
    data["name"] = "../../x"
    (folder / "escape.yaml").write_text(yaml.safe_dump(data))
    r = client.post("/api/sessions", json={"machine": str(folder / "escape.yaml"), "operator": "eve"}, headers=AUTH)
    assert r.status_code == 400 and "name" in r.json()["detail"]
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("**/x-session*"))
