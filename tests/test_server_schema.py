"""Acceptance 4: schemathesis over /openapi.json finds no 5xx and no response-schema violation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from ember.server.app import create_app
from server_support import FakeEngine, make_settings

schemathesis = pytest.importorskip("schemathesis")

_app = None


def _make_app(tmp_root):
    global _app
    if _app is None:
        _app = create_app(make_settings(tmp_root), FakeEngine())
    return _app


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from fastapi.testclient import TestClient

    app = _make_app(tmp_path_factory.mktemp("schema"))
    with TestClient(app):  # runs the lifespan: worker started, stopped at the end
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_openapi_fuzz(schema):

    failures = []
    for operation in schema.get_all_operations():
        op = operation.ok()
        try:
            _fuzz(op)()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:600]}")
    assert not failures, "\n".join(failures)


def _fuzz(op):
    from hypothesis import given
    from schemathesis import checks

    @given(op.as_strategy())
    @settings(max_examples=25, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(case):
        response = case.call()
        case.validate_response(response, checks=[checks.not_a_server_error,
                                                 checks.response_schema_conformance])  # fmt: skip

    return run
