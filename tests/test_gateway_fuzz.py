"""The gateway fuzzed from its own OpenAPI document (schemathesis): no 5xx, and every 4xx body names the problem.

A real gateway process on the run's Redis, with an API key (every request carries it, so the
requests get past authentication to the routes' own checks); no worker: jobs that pass are
queued and flushed with the database. The event stream is left out (a queued job's stream
stays open by design); tests/test_gateway.py covers it.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from metrics_scrape import free_port

from maskfleet.gateway.api_keys import new_key
from fleet_workers import Gateway, claim_db_url, flush, require_redis

require_redis()

TOKEN, ENTRY = new_key("fuzz", ["submit", "read", "cancel"])


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-fuzz")
    url = claim_db_url()
    (root / "keys.jsonl").write_text(json.dumps(ENTRY) + "\n")
    gateway = Gateway(free_port(), {"MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url,
                                    "MASKFLEET_API_KEYS_FILE": str(root / "keys.jsonl")}, root / "gateway.log")
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()
        flush(url)


def operations(gateway) -> list:
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    return [op for op in found if not op.path.endswith("/events")]


def test_every_operation_is_fuzzed(gateway):
    names = {f"{op.method.upper()} {op.path}" for op in operations(gateway)}
    assert {"POST /v1/jobs", "PUT /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel",
            "POST /v1/uploads"} <= names


@pytest.mark.parametrize("route", ["POST /v1/jobs", "PUT /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}",
                                   "POST /v1/jobs/{job_id}/cancel", "POST /v1/uploads"])
def test_no_server_errors_and_every_4xx_names_the_problem(gateway, route):
    (operation,) = [op for op in operations(gateway) if f"{op.method.upper()} {op.path}" == route]

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def request(case):
        response = case.call(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["type"] and error["message"], response.text

    request()
