"""HTTP client of the control server, as the console uses it (the console talks HTTP only)."""

from __future__ import annotations

import datetime as dt
import os

import httpx

DEFAULT_SERVER = "http://127.0.0.1:8765"


class ServerUnreachable(RuntimeError):
    """No control server answers at the configured address."""


class ApiError(RuntimeError):
    """The server refused a request; `detail` is its explanation."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def format_time(iso: str | None) -> str:
    """ISO time from the server -> 'YYYY-MM-DD HH:MM:SS UTC' (always with its zone)."""
    if not iso:
        return "-"
    t = dt.datetime.fromisoformat(iso)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class ConsoleClient:
    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 10.0):
        self.base_url = (base_url or os.environ.get("TBSAC_SERVER_URL") or DEFAULT_SERVER).rstrip("/")
        self.token = token if token is not None else os.environ.get("TBSAC_OPERATOR_TOKEN", "")
        self.timeout = timeout

    def _request(self, method: str, path: str, **kwargs):
        headers = {"Authorization": f"Bearer {self.token}"} if method == "POST" and self.token else {}
        try:
            r = httpx.request(method, self.base_url + path, headers=headers, timeout=self.timeout, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"no control server at {self.base_url} ({type(exc).__name__})") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # pydantic validation errors
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            raise ApiError(r.status_code, str(detail))
        return r

    def get(self, path: str, **params):
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: dict | None = None):
        return self._request("POST", path, json=body or {}).json()

    # -- the API -----------------------------------------------------------------------
    def health(self) -> dict:
        return self.get("/api/health")

    def machines(self) -> list[dict]:
        return self.get("/api/machines")

    def machine_live(self, name: str) -> dict:
        """What the machine's interlock channels read now, independent of sessions."""
        return self.get(f"/api/machines/{name}/live")

    def policies(self) -> dict:
        return self.get("/api/policies")

    def sessions(self, status: str | None = None, machine: str | None = None, limit: int = 200, operator: str | None = None,
                 task: str | None = None, started_from=None, started_to=None) -> list[dict]:
        return self.get("/api/sessions", status=status, machine=machine, limit=limit, operator=operator, task=task,
                        started_from=started_from.isoformat() if started_from else None,
                        started_to=started_to.isoformat() if started_to else None)

    def session(self, sid: int) -> dict:
        return self.get(f"/api/sessions/{sid}")

    def steps(self, sid: int) -> list[dict]:
        return self.get(f"/api/sessions/{sid}/steps")

    def events(self, sid: int) -> list[dict]:
        return self.get(f"/api/sessions/{sid}/events")

    def replay(self, sid: int) -> dict:
        return self.get(f"/api/sessions/{sid}/replay")

    def export_csv(self, sid: int) -> str:
        return self._request("GET", f"/api/sessions/{sid}/export").text

    def report(self, sid: int) -> str:
        """The session's logbook report (Markdown)."""
        return self._request("GET", f"/api/sessions/{sid}/report").text

    def training_runs(self) -> list[dict]:
        return self.get("/api/training-runs")

    def evaluations(self) -> list[dict]:
        return self.get("/api/evaluations")

    def start(self, **body) -> int:
        return self.post("/api/sessions", body)["session"]

    def dial_in(self, sid: int, step: int, operator: str) -> int:
        """Start an approve-mode session going to the settings of `step` of session `sid`."""
        return self.post(f"/api/sessions/{sid}/dial-in", {"step": step, "operator": operator})["session"]

    def command(self, sid: int, command: str, operator: str, proposal: int | None = None) -> dict:
        body = {"operator": operator}
        if proposal is not None:
            body["proposal"] = proposal
        return self.post(f"/api/sessions/{sid}/{command}", body)
