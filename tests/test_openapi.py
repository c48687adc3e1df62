"""Schemathesis against the gateway's own OpenAPI document, on the real stack: requests generated from the schema
(valid and invalid ones) never get a 5xx, and every response is one the document declares (status, content type,
body schema)."""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def operations(stack):
    schema = schemathesis.openapi.from_url(stack.gateway_url + "/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_document_names_every_route_and_the_openai_errors(operations, stack):
    assert set(operations) == {"GET /health", "GET /ready", "GET /metrics", "GET /v1/models",
                               "GET /v1/models/{model}", "POST /v1/chat/completions"}
    chat = httpx.get(stack.gateway_url + "/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429", "503"} <= set(chat["responses"]) and "422" not in chat["responses"]


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# The chat route, valid and invalid bodies; the other GETs take no parameters, so they have no invalid form (a model
# name is any string: an unknown one is the declared 404).
RUNS = [("POST /v1/chat/completions", POSITIVE, 50), ("POST /v1/chat/completions", NEGATIVE, 50),
        ("GET /v1/models/{model}", POSITIVE, 20),
        *[(route, POSITIVE, 3) for route in ("GET /v1/models", "GET /health", "GET /ready", "GET /metrics")]]


@pytest.mark.parametrize("route,mode,examples", RUNS, ids=[f"{r}-{m.value}" for r, m, _ in RUNS])
def test_generated_requests_get_declared_answers_and_no_5xx(operations, stack, route, mode, examples):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operations[route].as_strategy(generation_mode=mode))
    def check(case):
        case.call_and_validate(base_url=stack.gateway_url, checks=CHECKS, timeout=30)

    check()
