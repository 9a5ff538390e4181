"""Property-based API testing with schemathesis: no request the schema allows (or
breaks) may produce a server error, and every response must match the schema."""

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

_data = tempfile.mkdtemp(prefix="tbsac-schema-")
os.environ.setdefault("TBSAC_DATA_DIR", _data)

from controller.store import Store  # noqa: E402
from ui.server import create_app  # noqa: E402

TOKEN = "schema-token"
# schemathesis calls the app as host "testserver"; the server allows only the hosts it is told.
app = create_app(Store(f"sqlite:///{_data}/schema.sqlite"), TOKEN, allowed_hosts=["testserver", "127.0.0.1", "localhost"])
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_with_a_server_error(case):
    from schemathesis.checks import not_a_server_error

    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    case.validate_response(response, checks=(not_a_server_error,))
    assert response.status_code < 500
