"""schemathesis reads /openapi.json and fires generated requests at a live HTTP server.

Every response must be no 5xx and must match the documented status codes,
content types and body schemas.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from werkzeug.serving import make_server

from tests.conftest import FUZZ_CASES

EXAMPLES_PER_OPERATION = 100
# Not checked: that every schema-valid request succeeds. Some rules are beyond
# JSON Schema (no NUL or blank text, cursors this service issued, expiry in the
# future, limits set at run time) and rightly answer 400 or 413.
# Which key each operation is called with, so that generated requests get past auth;
# the authorization matrix in test_auth.py covers the other keys.
ROLE_FOR_PATH = {
    "/conversations": "staff",
    "/keys": "admin",
    "/keys/revoke": "admin",
    "/knowledge/documents": "staff",
    "/knowledge/documents/{document_id}": "admin",
}


@pytest.fixture
def live_server(app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def test_api_honours_its_openapi_contract(live_server, keys):
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    sent: Counter[str] = Counter()

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def call(case) -> None:
            secret = keys[ROLE_FOR_PATH.get(case.operation.path, "client_a")]
            case.call_and_validate(
                base_url=live_server,
                headers={"Authorization": f"Bearer {secret}"},
                excluded_checks=[positive_data_acceptance],
            )
            FUZZ_CASES[f"{case.method} {case.operation.path}"] += 1
            sent[f"{case.method} {case.operation.path}"] += 1

        call()

    assert len(operations) >= 10
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"
        raw = operation.definition.raw
        takes_input = bool(raw.get("parameters") or raw.get("requestBody") or raw.get("security"))
        # An operation without any input (the probes) has a single request to send; every other one the full count.
        assert sent[name] == (EXAMPLES_PER_OPERATION if takes_input else 1), (name, sent[name])
