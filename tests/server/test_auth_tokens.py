"""Tokens without the cluster: their shape, digest and checks, the scope ladder, the tokens a
deployment bootstraps, and the admin token file of the local stack, on the real databases."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from jobs.errors import Conflict, Unauthorized
from jobs.settings import Settings
from jobs.store import Store, utcnow
from server.auth import (
    SCOPES,
    Scope,
    bearer_token,
    bootstrap_tokens,
    digest,
    document_scopes,
    generate_token,
    grants,
    issue_token,
    parse_token,
    verify,
)
from server.client import find_token
from server.local import ensure_admin_token


def test_generated_tokens_parse_into_an_id_and_a_long_random_secret() -> None:
    tokens = {generate_token() for _ in range(100)}

    assert len(tokens) == 100
    for token in tokens:
        parsed = parse_token(token)
        assert parsed is not None
        token_id, secret = parsed
        assert token == f"tl_{token_id}_{secret}"
        assert len(token_id) == 12 and len(secret) == 43


@pytest.mark.parametrize(
    "token",
    [
        "",
        "tl_",
        "tl_abc_" + "A" * 43,  # id too short
        "tl_ABCDEFGHIJKL_" + "A" * 43,  # id not lower case
        "tl_abcdefghijkl_" + "A" * 31,  # secret too short
        "tl_abcdefghijkl_" + "A" * 42 + "!",
        "xx_abcdefghijkl_" + "A" * 43,
        " tl_abcdefghijkl_" + "A" * 43,
    ],
)
def test_malformed_tokens_do_not_parse(token: str) -> None:
    assert parse_token(token) is None


def test_digest_is_the_sha256_of_the_secret() -> None:
    assert digest("secret") == hashlib.sha256(b"secret").hexdigest()


@pytest.mark.parametrize(
    ("held", "needed", "granted"),
    [
        ("read", Scope.READ, True),
        ("read", Scope.SUBMIT, False),
        ("read", Scope.ADMIN, False),
        ("submit", Scope.READ, True),
        ("submit", Scope.SUBMIT, True),
        ("submit", Scope.ADMIN, False),
        ("admin", Scope.READ, True),
        ("admin", Scope.SUBMIT, True),
        ("admin", Scope.ADMIN, True),
        ("root", Scope.READ, False),
    ],
)
def test_each_scope_grants_itself_and_those_below(held: str, needed: Scope, granted: bool) -> None:
    assert grants(held, needed) is granted


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "needs a token"),
        ("", "needs a token"),
        ("Basic dXNlcjpwdw==", "not 'Basic'"),
        ("Bearer ", "not 'Bearer'"),
    ],
)
def test_authorization_header_must_be_bearer(header: str | None, reason: str) -> None:
    with pytest.raises(Unauthorized, match=reason):
        bearer_token(header)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token("bearer tl_x") == "tl_x"


def test_issued_token_verifies_and_its_row_holds_only_the_digest(store: Store) -> None:
    row, plain = issue_token(store, name="ci", scope=Scope.SUBMIT)
    parsed = parse_token(plain)
    assert parsed is not None

    assert verify(plain, store.find_token).id == row.id
    stored = store.find_token(row.id)
    assert stored is not None and stored.secret_sha256 == digest(parsed[1])
    assert plain not in repr(vars(stored)) and parsed[1] not in repr(vars(stored))


def test_wrong_secret_and_unknown_id_are_refused_alike(store: Store) -> None:
    row, _ = issue_token(store, name="ci", scope=Scope.READ)

    for token in (f"tl_{row.id}_{'A' * 43}", f"tl_{'0' * 12}_{'A' * 43}", "junk"):
        with pytest.raises(Unauthorized, match=r"^the bearer token is not valid$"):
            verify(token, store.find_token)


def test_revoked_and_expired_tokens_are_refused(store: Store) -> None:
    revoked, revoked_plain = issue_token(store, name="old", scope=Scope.ADMIN)
    _, expired_plain = issue_token(
        store, name="brief", scope=Scope.ADMIN, expires_at=utcnow() - timedelta(seconds=1)
    )
    _, fresh_plain = issue_token(
        store, name="fresh", scope=Scope.ADMIN, expires_at=utcnow() + timedelta(days=1)
    )
    first = store.revoke_token(revoked.id).revoked_at

    with pytest.raises(Unauthorized, match="was revoked"):
        verify(revoked_plain, store.find_token)
    with pytest.raises(Unauthorized, match="expired at"):
        verify(expired_plain, store.find_token)
    assert verify(fresh_plain, store.find_token).name == "fresh"
    assert store.revoke_token(revoked.id).revoked_at == first


def test_bootstrap_stores_the_digests_once_with_their_scopes(store: Store) -> None:
    admin, metrics = generate_token(), generate_token()
    settings = Settings(admin_token=SecretStr(admin), metrics_token=SecretStr(metrics))

    bootstrap_tokens(store, settings)
    bootstrap_tokens(store, settings)  # a restart, or a second replica

    assert verify(admin, store.find_token).scope == "admin"
    assert verify(metrics, store.find_token).scope == "read"
    assert len(store.list_tokens()) == 2


def test_a_revoked_bootstrap_token_stays_revoked_after_a_restart(store: Store) -> None:
    admin = generate_token()
    settings = Settings(admin_token=SecretStr(admin))
    bootstrap_tokens(store, settings)
    parsed = parse_token(admin)
    assert parsed is not None
    store.revoke_token(parsed[0])

    bootstrap_tokens(store, settings)

    with pytest.raises(Unauthorized, match="revoked"):
        verify(admin, store.find_token)


def test_bootstrap_refuses_a_token_whose_id_belongs_to_another(store: Store) -> None:
    row, _ = issue_token(store, name="someone", scope=Scope.READ)
    clash = f"tl_{row.id}_{'C' * 43}"

    with pytest.raises(Conflict, match="TUNELOOP_ADMIN_TOKEN"):
        bootstrap_tokens(store, Settings(admin_token=SecretStr(clash)))


def test_bootstrap_refuses_a_malformed_token_naming_the_variable(store: Store) -> None:
    with pytest.raises(ValueError, match="TUNELOOP_METRICS_TOKEN must look like tl_"):
        bootstrap_tokens(store, Settings(metrics_token=SecretStr("hunter2")))


def test_bootstrap_tokens_never_travel_in_a_settings_dump() -> None:
    settings = Settings(admin_token=SecretStr(generate_token()))

    assert "admin_token" not in settings.model_dump(mode="json")
    assert "tl_" not in repr(settings)


def test_local_stack_writes_an_admin_token_its_owner_alone_reads(settings: Settings) -> None:
    assert ensure_admin_token(settings) is True
    path = settings.admin_token_file()
    token = path.read_text().strip()

    assert path.stat().st_mode & 0o777 == 0o600
    store = Store.open(settings.resolved_database_url())
    try:
        assert verify(token, store.find_token).scope == "admin"
    finally:
        store.engine.dispose()
    database = Path(settings.resolved_database_url().removeprefix("sqlite:///")).read_bytes()
    assert token.split("_", 2)[2].encode() not in database


def test_local_stack_keeps_a_good_token_and_replaces_a_refused_one(settings: Settings) -> None:
    ensure_admin_token(settings)
    first = settings.admin_token_file().read_text()

    assert ensure_admin_token(settings) is False
    assert settings.admin_token_file().read_text() == first

    store = Store.open(settings.resolved_database_url())
    try:
        store.revoke_token(first.split("_")[1])
    finally:
        store.engine.dispose()
    assert ensure_admin_token(settings) is True
    assert settings.admin_token_file().read_text() != first
    assert settings.admin_token_file().stat().st_mode & 0o777 == 0o600


def test_client_token_comes_from_the_environment_then_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "admin-token"
    monkeypatch.delenv("TUNELOOP_TOKEN", raising=False)

    assert find_token(path) is None
    path.write_text("tl_from_file\n")
    assert find_token(path) == "tl_from_file"
    monkeypatch.setenv("TUNELOOP_TOKEN", "tl_from_env")
    assert find_token(path) == "tl_from_env"


def test_an_api_with_a_route_missing_from_the_scope_table_is_refused() -> None:
    from server.api import operations, router

    api = FastAPI()
    api.include_router(router)
    api.include_router(operations)

    @api.get("/v1/unguarded")
    async def unguarded() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match=r"differ on \[\('GET', '/v1/unguarded'\)\]$"):
        document_scopes(api)


def test_the_scope_table_names_only_routes_that_exist() -> None:
    from server.api import build_api

    documented = build_api().openapi()["paths"]

    for method, path in SCOPES:
        assert method.lower() in documented[path], (method, path)
