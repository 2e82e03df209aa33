"""Bearer tokens: how they look, how they are checked, and the scope each route needs.

A token reads ``tl_<id>_<secret>``: the id finds its row in the store without a scan, the secret
is 32 random bytes. Only the secret's SHA-256 digest is stored; a fast digest is enough because
the secret is random and long, so there is nothing to guess from a digest (slow password hashes
exist for short secrets people choose).

Scopes form a ladder, each granting the ones below it:

- ``read``: look at jobs, datasets, models, drift reports and the metrics;
- ``submit``: also submit and cancel jobs, upload datasets, predict and send feedback, the
  things that make the cluster work or change what the drift monitor sees;
- ``admin``: also promote a model version by hand and manage tokens.

``BearerAuth`` authenticates every request before routing, so an unknown path or method is
refused like any other, then checks the scope ``SCOPES`` gives the route: one table, an
allowlist, that ``document_scopes`` holds against the API's routes when the API is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import string
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from jobs.errors import Conflict, Unauthorized
from jobs.settings import Settings
from jobs.store import ApiToken, Store, utcnow
from server.errors import error_body

log = logging.getLogger(__name__)


class Scope(StrEnum):
    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


LADDER = [Scope.READ, Scope.SUBMIT, Scope.ADMIN]


def grants(held: str, needed: Scope) -> bool:
    """Whether a token of scope ``held`` may do what needs ``needed``."""
    return held in LADDER and LADDER.index(Scope(held)) >= LADDER.index(needed)


# -- the token itself ------------------------------------------------------------------------

ID_ALPHABET = string.ascii_lowercase + string.digits
TOKEN_FORMAT = re.compile(r"tl_(?P<id>[a-z0-9]{12})_(?P<secret>[A-Za-z0-9_-]{32,128})")
TOKEN_SHAPE = "tl_<12 lowercase letters or digits>_<32 to 128 letters, digits, '-' or '_'>"


def generate_token() -> str:
    token_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(12))
    return f"tl_{token_id}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    match = TOKEN_FORMAT.fullmatch(token)
    return (match["id"], match["secret"]) if match else None


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_token(
    store: Store,
    *,
    name: str,
    scope: Scope,
    expires_at: datetime | None = None,
    created_by: str | None = None,
) -> tuple[ApiToken, str]:
    """Make and store a new token; returns its row and the plain token, which exists only here."""
    plain = generate_token()
    parsed = parse_token(plain)
    assert parsed is not None, "generate_token makes well-formed tokens"
    token_id, secret = parsed
    row = store.add_token(
        ApiToken(
            id=token_id,
            name=name,
            scope=scope,
            secret_sha256=digest(secret),
            created_by=created_by,
            expires_at=expires_at,
        )
    )
    log.info("token %s (%s, scope %s) created by %s", row.id, name, scope, created_by or "tuneloop")
    return row, plain


def expiry(days: int | None) -> datetime | None:
    return utcnow() + timedelta(days=days) if days is not None else None


def verify(token: str, find: Callable[[str], ApiToken | None]) -> ApiToken:
    """The stored token that ``token`` proves, or Unauthorized saying why not.

    An unknown id and a wrong secret get the same answer, so ids cannot be probed; only someone
    holding the whole token learns that it was revoked or has expired.
    """
    parsed = parse_token(token)
    row = find(parsed[0]) if parsed else None
    if (
        parsed is None
        or row is None
        or not hmac.compare_digest(row.secret_sha256, digest(parsed[1]))
    ):
        raise Unauthorized("the bearer token is not valid", field="Authorization")
    if row.revoked_at is not None:
        raise Unauthorized(f"token {row.id} was revoked", field="Authorization")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise Unauthorized(
            f"token {row.id} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC", field="Authorization"
        )
    return row


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise Unauthorized(
            "this route needs a token: send 'Authorization: Bearer <token>'", field="Authorization"
        )
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            f"the Authorization header must be 'Bearer <token>', not {kind!r}",
            field="Authorization",
        )
    return token.strip()


# -- tokens given by the environment ---------------------------------------------------------


def bootstrap_tokens(store: Store, settings: Settings) -> None:
    """Store the digests of the admin and metrics tokens the deployment was given, once.

    A bootstrapped token revoked through the API stays revoked: rotate it by giving a new token
    (a new id) and restarting, which leaves the old row as it was.
    """
    given = [
        ("TUNELOOP_ADMIN_TOKEN", settings.admin_token, Scope.ADMIN, "bootstrap admin"),
        ("TUNELOOP_METRICS_TOKEN", settings.metrics_token, Scope.READ, "bootstrap metrics"),
    ]
    for variable, secret_value, scope, name in given:
        if secret_value is not None:
            bootstrap_token(store, variable, secret_value.get_secret_value(), scope, name)


def bootstrap_token(store: Store, variable: str, token: str, scope: Scope, name: str) -> None:
    parsed = parse_token(token)
    if parsed is None:
        raise ValueError(
            f"{variable} must look like {TOKEN_SHAPE}; `tuneloop tokens generate` makes one"
        )
    token_id, secret = parsed
    existing = store.find_token(token_id)
    if existing is None:
        row = ApiToken(id=token_id, name=name, scope=scope, secret_sha256=digest(secret))
        try:
            existing = store.add_token(row)
        except IntegrityError:
            # Another API replica stored it first; its row must pass the same check.
            existing = store.find_token(token_id)
            if existing is None:
                raise
        else:
            log.info("token %s (%s, %s) bootstrapped from %s", token_id, name, scope, variable)
    if not hmac.compare_digest(existing.secret_sha256, digest(secret)) or existing.scope != scope:
        raise Conflict(
            f"{variable} has the id {token_id} of a different stored token; give a new token",
            field=variable,
        )


# -- enforcement -------------------------------------------------------------------------------

# GET only. /healthz is for liveness probes and says nothing but "ok"; /docs and /openapi.json
# describe the API's shape, which is public in the source anyway, and /docs then sends a token
# with every call it tries ("Authorize").
OPEN = frozenset({("GET", "/healthz"), ("GET", "/docs"), ("GET", "/openapi.json")})

# Every route and the scope it needs, in one place to review.
SCOPES: dict[tuple[str, str], Scope] = {
    ("GET", "/metrics"): Scope.READ,
    ("GET", "/v1/jobs"): Scope.READ,
    ("GET", "/v1/jobs/{job_id}"): Scope.READ,
    ("GET", "/v1/jobs/{job_id}/log"): Scope.READ,
    ("GET", "/v1/jobs/{job_id}/metrics"): Scope.READ,
    ("GET", "/v1/jobs/{job_id}/trials"): Scope.READ,
    ("GET", "/v1/datasets"): Scope.READ,
    ("GET", "/v1/models"): Scope.READ,
    ("GET", "/v1/models/{name}"): Scope.READ,
    ("GET", "/v1/models/{name}/drift"): Scope.READ,
    ("GET", "/v1/drift/{report_id}"): Scope.READ,
    ("GET", "/v1/drift/{report_id}/report"): Scope.READ,
    ("POST", "/v1/jobs"): Scope.SUBMIT,
    ("POST", "/v1/jobs/{job_id}/cancel"): Scope.SUBMIT,
    ("POST", "/v1/datasets"): Scope.SUBMIT,
    ("POST", "/v1/datasets/import"): Scope.SUBMIT,
    ("POST", "/v1/models/{name}/predict"): Scope.SUBMIT,
    ("POST", "/v1/models/{name}/predict/upload"): Scope.SUBMIT,
    ("POST", "/v1/models/{name}/feedback"): Scope.SUBMIT,
    ("POST", "/v1/models/{name}/promote"): Scope.ADMIN,
    ("POST", "/v1/tokens"): Scope.ADMIN,
    ("GET", "/v1/tokens"): Scope.ADMIN,
    ("DELETE", "/v1/tokens/{token_id}"): Scope.ADMIN,
}


# SCOPES as patterns, compiled the way the router compiles its routes.
PATTERNS = [(compile_path(path)[0], method, path) for method, path in SCOPES]


def match_route(method: str, path: str) -> tuple[str, Scope] | JSONResponse:
    """The route template a request names and the scope it needs, or the 404 or 405 answer to a
    request that SCOPES does not name, which therefore never reaches the router."""
    templates = [(m, template) for pattern, m, template in PATTERNS if pattern.match(path)]
    for allowed, template in templates:
        if allowed == method:
            return template, SCOPES[(method, template)]
    allowed_methods = sorted({m for m, _ in templates} | {m for m, p in OPEN if p == path})
    if not allowed_methods:
        return JSONResponse(error_body("not_found", f"no route {path!r}"), 404)
    message = f"{method} is not allowed on {path!r}; allowed: {', '.join(allowed_methods)}"
    return JSONResponse(
        error_body("method_not_allowed", message), 405, {"Allow": ", ".join(allowed_methods)}
    )


def unauthorized(exc: Unauthorized, *, presented: bool) -> JSONResponse:
    # RFC 6750: no error code when no credentials came, invalid_token when bad ones did.
    challenge = 'Bearer error="invalid_token"' if presented else "Bearer"
    return JSONResponse(
        error_body(exc.code, exc.message, exc.field), 401, {"WWW-Authenticate": challenge}
    )


class BearerAuth:
    """ASGI middleware in front of the router: every request but the open ones needs a valid
    token, and then the scope SCOPES gives its route.

    SCOPES is an allowlist: a request it does not name is answered here (404 or 405), so a route
    left out of it can never be reached. Unknown paths and methods are refused without a token
    like any other, so a stranger learns nothing about which paths exist. The token's row is
    left in the request's state.
    """

    def __init__(self, app: ASGIApp, *, find: Callable[[str], ApiToken | None]) -> None:
        self.app = app
        self.find = find

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the API has none; refuse rather than pass one on
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization")
        try:
            token = await asyncio.to_thread(verify, bearer_token(header), self.find)
        except Unauthorized as exc:
            await unauthorized(exc, presented=header is not None)(scope, receive, send)
            return
        route = match_route(scope["method"], scope["path"])
        if isinstance(route, JSONResponse):
            await route(scope, receive, send)
            return
        template, needed = route
        if not grants(token.scope, needed):
            message = (
                f"{scope['method']} {template} needs the {needed.value!r} scope; token "
                f"{token.id} has {token.scope!r}"
            )
            await JSONResponse(error_body("forbidden", message, "scope"), 403)(scope, receive, send)
            return
        scope.setdefault("state", {})["token"] = token
        await self.app(scope, receive, send)


def document_scopes(app: FastAPI) -> None:
    """Put the bearer scheme and each operation's scope (``x-tuneloop-scope``) in the OpenAPI
    document, so /docs offers to send a token; refuse an API whose operations and SCOPES
    differ, as a route missing from SCOPES could never be reached."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": TOKEN_SHAPE}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                needed = SCOPES.get((method.upper(), path))
                if needed is not None:
                    operation["security"] = [{"bearer": []}]
                    operation["x-tuneloop-scope"] = needed.value
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    if difference := documented ^ (set(SCOPES) | {("GET", "/healthz")}):
        raise RuntimeError(
            f"server.auth.SCOPES and the API's routes differ on {sorted(difference)}"
        )
