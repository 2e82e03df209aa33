"""A Python client for tuneloop's REST API; the CLI and the demo speak through it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from jobs.spec import load_spec_document

FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}


def find_token(token_file: Path) -> str | None:
    """TUNELOOP_TOKEN, else the token in ``token_file`` (the admin token `tuneloop up` wrote),
    else None."""
    if token := os.environ.get("TUNELOOP_TOKEN"):
        return token
    return token_file.read_text().strip() if token_file.is_file() else None


class ApiError(Exception):
    """The server refused a request; ``code`` and ``field`` come from its JSON error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 60.0,
        keep_alive: bool = True,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Without keep-alive no socket outlives its request, for callers that never close().
        limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, limits=limits
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:500], "field": None}
            raise ApiError(
                response.status_code, error["code"], error["message"], error.get("field")
            )
        return response.json()

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/healthz"))

    def submit(self, spec: dict[str, Any] | Path, *, idempotency_key: str | None = None) -> Any:
        document = load_spec_document(spec.read_text()) if isinstance(spec, Path) else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=document, headers=headers)

    def jobs(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._call("GET", "/v1/jobs", params=params)["jobs"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/jobs/{job_id}/cancel"))

    def log(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/jobs/{job_id}/log", params={"after": after})["lines"])

    def epochs(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/jobs/{job_id}/metrics")["epochs"])

    def trials(self, job_id: str) -> dict[str, Any]:
        """A search job's trials, with the metric they are compared on and its mode."""
        return dict(self._call("GET", f"/v1/jobs/{job_id}/trials"))

    def upload(self, path: Path, *, name: str | None = None) -> dict[str, Any]:
        with path.open("rb") as handle:
            files = {"file": (path.name, handle)}
            data = {"name": name} if name else {}
            return dict(self._call("POST", "/v1/datasets", files=files, data=data))

    def datasets(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/datasets")["datasets"])

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/models")["models"])

    def model(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/models/{name}"))

    def promote(self, name: str, version: int) -> dict[str, Any]:
        return dict(self._call("POST", f"/v1/models/{name}/promote", json={"version": version}))

    def predict(self, name: str, texts: list[str]) -> dict[str, Any]:
        """Texts, or for an image model images in base64."""
        return dict(self._call("POST", f"/v1/models/{name}/predict", json={"inputs": texts}))

    def predict_files(self, name: str, paths: list[Path]) -> dict[str, Any]:
        """Image files, sent as a multipart upload."""
        files = [("files", (path.name, path.read_bytes())) for path in paths]
        return dict(self._call("POST", f"/v1/models/{name}/predict/upload", files=files))

    def feedback(
        self,
        name: str,
        *,
        labels: list[dict[str, str]] | None = None,
        rows: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        body = {"labels": labels or [], "rows": rows or []}
        return dict(self._call("POST", f"/v1/models/{name}/feedback", json=body))

    def drift_reports(self, name: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/v1/models/{name}/drift")["reports"])

    def create_token(
        self, name: str, scope: str, *, expires_in_days: int | None = None
    ) -> dict[str, Any]:
        """A new token; its plain text is in the answer's ``token``, and nowhere else."""
        body = {"name": name, "scope": scope, "expires_in_days": expires_in_days}
        return dict(self._call("POST", "/v1/tokens", json=body))

    def tokens(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/tokens")["tokens"])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/tokens/{token_id}"))

    def follow(self, job_id: str, interval: float = 1.0) -> Iterator[dict[str, Any]]:
        """Yield the job each ``interval`` seconds until it finishes, then once more."""
        while True:
            job = self.job(job_id)
            yield job
            if job["status"] in FINISHED:
                return
            time.sleep(interval)

    def wait(self, job_id: str, timeout: float = 3600, interval: float = 1.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for job in self.follow(job_id, interval):
            if job["status"] in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        raise AssertionError("follow always ends on a finished job")
