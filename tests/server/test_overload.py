"""Overload: a predictor whose Serve queue is full makes the API answer 503 with Retry-After.

The predictor is the real deployment on the session's Ray cluster, in an application of its own
with Serve's queue limits cut to one request running and one waiting, so that a burst passes
them at once. The API is the real application, called in this process through its ASGI
interface with that predictor's handle, because the session's HTTP stack has a predictor sized
for ordinary traffic that a test cannot fill without loading the machine for minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from ray import serve

from server.api import Services, build_api, set_services
from server.auth import Scope, issue_token
from server.predictor import Predictor
from tests.conftest import Stack

pytestmark = pytest.mark.integration

APP = "overload-test"
BURST = 40


@pytest.fixture
def small_queue_predictor(stack: Stack) -> Iterator[object]:
    limited = Predictor.options(
        max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0}
    )
    handle = serve.run(
        limited.bind(stack.settings.model_dump(mode="json")), name=APP, route_prefix=None
    )
    try:
        yield handle
    finally:
        serve.delete(APP)


async def burst(app: object, token: str, count: int) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api", headers=headers, timeout=60
    ) as http:
        return await asyncio.gather(
            *(
                http.post("/v1/models/absent/predict", json={"inputs": [f"text {i}"]})
                for i in range(count)
            )
        )


def test_a_full_predictor_queue_answers_503_with_retry_after(
    stack: Stack, small_queue_predictor: object
) -> None:
    set_services(
        Services(stack.settings, stack.store, predictor=small_queue_predictor, metrics=None)
    )
    _, token = issue_token(stack.store, name="overload", scope=Scope.SUBMIT)

    app = build_api()
    responses = asyncio.run(burst(app, token, BURST))

    statuses = [response.status_code for response in responses]
    refused = [response for response in responses if response.status_code == 503]
    # The requests Serve let through reach the predictor, which knows no model "absent".
    assert set(statuses) <= {404, 503}, statuses
    assert refused, f"no request of {BURST} passed a queue of one: {statuses}"
    assert statuses.count(404) >= 1, statuses
    for response in refused:
        assert response.headers["Retry-After"] == "5"
        error = response.json()["error"]
        assert error["code"] == "overloaded"
        assert "capacity" in error["message"]
    # Once the burst has drained, the next request gets through again.
    (after,) = asyncio.run(burst(app, token, 1))
    assert after.status_code == 404, after.text
