"""Schemathesis against the API's own OpenAPI schema, over HTTP on the session's real stack.

Every operation gets cases that fit the schema and cases that break it (wrong types, missing
and extra fields, out-of-range values, malformed bodies). The properties: no answer is a 5xx,
and every 4xx body is tuneloop's error document naming the field at fault. The run is seeded
and derandomized, so it generates the same cases each time.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.adapter.parameters import ParameterLocation

from tests.conftest import Stack

pytestmark = pytest.mark.integration

CASES_PER_OPERATION_AND_MODE = 40
# 4xx answers that concern no field: the route or method itself.
FIELDLESS = {"not_found", "method_not_allowed"}


def auth_headers(stack: Stack) -> dict[str, str]:
    """The client's credentials, so the fuzzer is let in wherever the client is."""
    return {k: v for k, v in stack.client.http.headers.items() if k.lower() == "authorization"}


def modes_for(operation: Any) -> tuple[GenerationMode, ...]:
    """Negative cases too where there is input to break: a body or a query. Path parameters
    here are all strings, which any text fits, so they alone leave nothing invalid to send."""
    breakable = bool(operation.body) or any(
        parameter.location is not ParameterLocation.PATH
        for parameter in operation.iter_parameters()
    )
    if breakable:
        return (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return (GenerationMode.POSITIVE,)


def check_answer(response: Any, label: str) -> None:
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
    if response.status_code < 400:
        return
    error = response.json()["error"]
    assert error["code"] and error["message"], f"{label}: {response.text[:500]}"
    if response.status_code == 404 and error["code"] == "not_found" and not error["field"]:
        # An unknown route; fuzzed path parameters that name no object carry a field.
        assert "Not Found" in error["message"], f"{label}: {response.text[:500]}"
        return
    assert error["field"], f"{label}: a {response.status_code} naming no field: {response.text}"


def test_fuzzed_requests_get_no_5xx_and_4xx_name_the_field(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    headers = auth_headers(stack)
    statuses: Counter[int] = Counter()
    spent: dict[str, float] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18

    def fuzzer(operation: Any, mode: GenerationMode, label: str) -> Callable[[], None]:
        @settings(
            max_examples=CASES_PER_OPERATION_AND_MODE,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=stack.url, headers=headers, timeout=30)
            statuses[response.status_code] += 1
            check_answer(response, f"{label} ({mode}) {case.as_curl_command()}")

        return fuzz  # type: ignore[no-any-return]

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in modes_for(operation):
            started = time.monotonic()
            fuzzer(operation, mode, label)()
            spent[f"{label} {mode}"] = time.monotonic() - started

    cases = sum(statuses.values())
    print(f"fuzzed {cases} cases over {len(operations)} operations: {dict(statuses)}")
    print("slowest:", sorted(spent.items(), key=lambda item: -item[1])[:4])
    assert cases >= 1000
    assert sum(n for status, n in statuses.items() if 400 <= status < 500) >= 300
