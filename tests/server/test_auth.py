"""Authentication and scopes on the running application, over real HTTP: every route and method
of the OpenAPI document, and paths that do not exist."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from typer.testing import CliRunner

from jobs.store import utcnow
from server.auth import Scope, issue_token
from server.cli import app
from tests.conftest import Stack

pytestmark = pytest.mark.integration

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
UNKNOWN_PATHS = ("/", "/v1", "/v1/nope", "/admin", "/metrics/", "/healthz/x", "/v1/tokens/x/y")


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    """A bare HTTP client: no token unless a test gives one."""
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def schema(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def concrete(path: str) -> str:
    """An OpenAPI path with every parameter filled in."""
    return re.sub(r"\{[^}]+\}", "x1", path)


def every_request(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """Every method on every documented path, and on paths that do not exist."""
    paths = [concrete(path) for path in schema["paths"]] + list(UNKNOWN_PATHS)
    return [(method, path) for path in paths for method in METHODS]


def token_of(stack: Stack, scope: Scope, expires_at: datetime | None = None) -> str:
    _, plain = issue_token(stack.store, name=f"test {scope}", scope=scope, expires_at=expires_at)
    return plain


def assert_refused(response: httpx.Response, method: str, path: str, why: str) -> None:
    where = f"{method} {path} ({why})"
    assert response.status_code == 401, f"{where}: {response.status_code} {response.text}"
    assert response.headers["WWW-Authenticate"].startswith("Bearer"), where
    if method != "HEAD":
        assert response.json()["error"]["code"] == "unauthorized", where


def test_healthz_is_open_and_says_nothing_but_ok(http: httpx.Client) -> None:
    response = http.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_every_route_and_method_refuses_a_request_without_a_token(
    http: httpx.Client, schema: dict[str, Any]
) -> None:
    requests = every_request(schema)
    assert len(requests) > 150  # the document really listed the routes

    for method, path in requests:
        if (method, path) == ("GET", "/healthz"):
            continue
        response = http.request(method, path)
        assert_refused(response, method, path, "no token")
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_every_route_and_method_refuses_bad_revoked_and_expired_tokens(
    stack: Stack, http: httpx.Client, schema: dict[str, Any]
) -> None:
    admin = token_of(stack, Scope.ADMIN)
    token_id = admin.split("_")[1]
    revoked = token_of(stack, Scope.ADMIN)
    stack.store.revoke_token(revoked.split("_")[1])
    expired = token_of(stack, Scope.ADMIN, expires_at=utcnow() - timedelta(seconds=1))
    bad = {
        "malformed": "Bearer not-a-token",
        "wrong secret": f"Bearer tl_{token_id}_{'A' * 43}",
        "unknown id": f"Bearer tl_{'0' * 12}_{'A' * 43}",
        "not bearer": f"Basic {admin}",
        "revoked": f"Bearer {revoked}",
        "expired": f"Bearer {expired}",
    }

    for method, path in every_request(schema):
        if (method, path) == ("GET", "/healthz"):
            continue
        for why, header in bad.items():
            response = http.request(method, path, headers={"Authorization": header})
            assert_refused(response, method, path, why)


def test_refusals_say_why_only_to_the_holder_of_the_whole_token(
    stack: Stack, http: httpx.Client
) -> None:
    revoked = token_of(stack, Scope.READ)
    stack.store.revoke_token(revoked.split("_")[1])
    expired = token_of(stack, Scope.READ, expires_at=utcnow() - timedelta(minutes=1))
    guessed = f"tl_{revoked.split('_')[1]}_{'B' * 43}"

    def message(token: str) -> str:
        answer = http.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        return str(answer.json()["error"]["message"])

    assert "was revoked" in message(revoked)
    assert "expired at" in message(expired)
    assert message(guessed) == "the bearer token is not valid"


def test_docs_and_schema_are_open_and_name_every_route_scope(
    http: httpx.Client, schema: dict[str, Any]
) -> None:
    assert http.get("/docs").status_code == 200
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                assert "x-tuneloop-scope" not in operation
                continue
            assert operation["x-tuneloop-scope"] in {"read", "submit", "admin"}, (method, path)
            assert operation["security"] == [{"bearer": []}], (method, path)


@pytest.mark.parametrize("held", [Scope.READ, Scope.SUBMIT, Scope.ADMIN])
def test_a_token_gets_403_naming_the_scope_on_every_route_above_its_own(
    stack: Stack, http: httpx.Client, schema: dict[str, Any], held: Scope
) -> None:
    ladder = [Scope.READ, Scope.SUBMIT, Scope.ADMIN]
    headers = {"Authorization": f"Bearer {token_of(stack, held)}"}

    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                continue
            needed = Scope(operation["x-tuneloop-scope"])
            # No body: a granted request stops at validation or at a missing id, changing nothing.
            response = http.request(method.upper(), concrete(path), headers=headers)
            where = f"{held} token, {method.upper()} {path} needs {needed}"
            if ladder.index(held) < ladder.index(needed):
                assert response.status_code == 403, f"{where}: {response.text}"
                error = response.json()["error"]
                assert error["code"] == "forbidden" and error["field"] == "scope"
                assert f"needs the '{needed}' scope" in error["message"], where
            else:
                assert response.status_code not in (401, 403), f"{where}: {response.text}"


def test_scopes_are_the_documented_ladder(schema: dict[str, Any]) -> None:
    scopes = {
        (method.upper(), path): operation.get("x-tuneloop-scope")
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }

    assert scopes[("GET", "/metrics")] == "read"
    assert scopes[("GET", "/v1/jobs")] == "read"
    assert scopes[("POST", "/v1/jobs")] == "submit"
    assert scopes[("POST", "/v1/models/{name}/predict")] == "submit"
    assert scopes[("POST", "/v1/models/{name}/promote")] == "admin"
    assert {scopes[("POST", "/v1/tokens")], scopes[("DELETE", "/v1/tokens/{token_id}")]} == {
        "admin"
    }


def test_authenticated_requests_to_unknown_paths_and_methods_get_404_and_405(
    stack: Stack, http: httpx.Client
) -> None:
    headers = stack.auth

    missing = http.get("/v1/nope", headers=headers)
    wrong_method = http.put("/v1/jobs", headers=headers)

    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "GET, POST"


def test_tokens_are_created_listed_and_revoked_through_the_api(
    stack: Stack, http: httpx.Client
) -> None:
    made = stack.client.create_token("dashboards", "read", expires_in_days=30)
    headers = {"Authorization": f"Bearer {made['token']}"}

    assert http.get("/v1/jobs", headers=headers).status_code == 200
    listed = {t["id"]: t for t in stack.client.tokens()}
    assert listed[made["id"]]["scope"] == "read"
    assert listed[made["id"]]["expires_at"] is not None
    assert all("token" not in t and "secret_sha256" not in t for t in listed.values())
    assert listed[made["id"]]["created_by"] == stack.token.split("_")[1]

    revoked = stack.client.revoke_token(made["id"])
    assert revoked["revoked_at"] is not None
    refused = http.get("/v1/jobs", headers=headers)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_token_rows_hold_a_digest_never_the_token(stack: Stack) -> None:
    made = stack.client.create_token("stored", "submit")
    _, token_id, secret = made["token"].split("_", 2)

    with stack.store.engine.connect() as connection:
        query = sqlalchemy.text("select * from api_tokens where id = :id")
        row = connection.execute(query, {"id": token_id}).one()

    assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(value) for value in row)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "scope": "root"}, "scope"),
        ({"name": "", "scope": "read"}, "name"),
        ({"name": "x", "scope": "read", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "x", "scope": "read", "owner": "me"}, "owner"),
    ],
)
def test_bad_token_requests_are_422_naming_the_field(
    stack: Stack, http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    response = http.post("/v1/tokens", json=body, headers=stack.auth)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


def test_revoking_an_unknown_token_is_404(stack: Stack, http: httpx.Client) -> None:
    response = http.delete("/v1/tokens/nosuchtoken1", headers=stack.auth)

    assert response.status_code == 404
    assert response.json()["error"]["field"] == "token_id"


def cli(stack: Stack, *args: str, token: str | None = None) -> Any:
    return CliRunner().invoke(
        app, [*args, "--url", stack.url, "--token", token or stack.token], catch_exceptions=False
    )


def test_cli_creates_lists_and_revokes_tokens(stack: Stack, tmp_path: Path) -> None:
    created = cli(stack, "tokens", "create", "--name", "ci", "--scope", "submit")
    assert created.exit_code == 0, created.output
    plain = created.stdout.strip()
    token_id = plain.split("_")[1]
    assert re.fullmatch(r"tl_[a-z0-9]{12}_[A-Za-z0-9_-]{43}", plain)

    assert token_id in cli(stack, "tokens", "list").stdout
    assert plain not in cli(stack, "tokens", "list").stdout
    assert cli(stack, "jobs", "list", token=plain).exit_code == 0
    refused = cli(stack, "tokens", "list", token=plain)
    assert refused.exit_code == 1 and "403 forbidden" in refused.output

    assert cli(stack, "tokens", "revoke", token_id).exit_code == 0
    after = cli(stack, "jobs", "list", token=plain)
    assert after.exit_code == 1 and "401 unauthorized" in after.output


def test_cli_saves_a_token_to_a_file_only_its_owner_reads(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "prometheus.token"

    result = cli(stack, "tokens", "create", "--name", "prom", "--save", str(path))

    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().strip() not in result.output
    headers = {"Authorization": f"Bearer {path.read_text().strip()}"}
    assert httpx.get(f"{stack.url}/metrics", headers=headers, timeout=30).status_code == 200
    again = cli(stack, "tokens", "create", "--name", "prom", "--save", str(path))
    assert again.exit_code == 1 and "exists" in again.output


def test_cli_with_a_bad_token_exits_with_the_reason(stack: Stack) -> None:
    result = cli(stack, "models", "list", token="tl_000000000000_" + "A" * 43)

    assert result.exit_code == 1
    assert "401 unauthorized: the bearer token is not valid" in result.output
