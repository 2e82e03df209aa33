"""Hostile requests over HTTP on the session's real stack: oversized and endless bodies, deep
nesting, paths out of the data root, URLs into the server's own network, specs that try to
name code. Each is refused with a 4xx that names the field, quickly, and reads nothing it
should not."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.client import ApiError
from server.limits import MULTIPART_FRAMING_BYTES
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def reviews(stack: Stack) -> str:
    return stack.data_file("hostile-reviews.csv", read_sentiment("amazon").iloc[:80])


def error_of(response: httpx.Response) -> dict[str, Any]:
    return dict(response.json()["error"])


def test_chunked_body_over_the_limit_is_refused_before_it_is_read_whole(stack: Stack) -> None:
    # No Content-Length: the server can only count. The generator offers 1 GiB; a server that
    # read the body whole would take it all before answering.
    offered = 1024 * MiB
    yielded = 0

    def endless_body() -> Iterator[bytes]:
        nonlocal yielded
        chunk = b" " * (64 * 1024)
        while yielded < offered:
            yielded += len(chunk)
            yield chunk

    started = time.monotonic()
    response = stack.client.http.post(
        "/v1/jobs", content=endless_body(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert error_of(response)["field"] == "body"
    assert "limit of 1048576 bytes" in error_of(response)["message"]
    assert response.headers["connection"] == "close"
    # The limit is 1 MiB; what passes it is what crossed the sockets and the proxy's queue
    # during one round trip to the replica.
    assert yielded < 128 * MiB, f"the server consumed {yielded / MiB:.0f} MiB"
    assert time.monotonic() - started < 30


def test_declared_body_over_the_limit_is_refused_unread(stack: Stack) -> None:
    body = b'{"inputs": ["' + b"a" * (2 * MiB) + b'"]}'
    response = stack.client.http.post(
        "/v1/models/any/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert error_of(response) == {
        "code": "too_large",
        "message": f"body: the request body is {len(body)} bytes; the limit is 1048576",
        "field": "body",
    }


def test_upload_over_the_limit_is_refused_and_stores_nothing(stack: Stack, tmp_path: Path) -> None:
    limit = stack.settings.max_upload_bytes
    big = tmp_path / "big.csv"
    with big.open("wb") as handle:
        handle.write(b"text,label\n")
        handle.truncate(limit + MiB)  # sparse: costs no disk
    before = stack.client.datasets()

    started = time.monotonic()
    with pytest.raises(ApiError) as caught:
        stack.client.upload(big)
    assert caught.value.status == 413
    assert caught.value.field == "file"
    assert f"the limit is {limit + MULTIPART_FRAMING_BYTES}" in caught.value.message
    assert time.monotonic() - started < 30
    assert stack.client.datasets() == before


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b'{"model_name": "x", "data": ' + b"[" * 100_000],
    ids=["arrays", "objects", "inside-a-spec"],
)
def test_deeply_nested_json_is_refused_quickly(stack: Stack, body: bytes) -> None:
    started = time.monotonic()
    response = stack.client.http.post(
        "/v1/jobs", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert error_of(response)["field"] == "body"
    assert "nested too deeply" in error_of(response)["message"]
    assert time.monotonic() - started < 10


def test_nesting_that_decodes_is_refused_by_the_spec_depth_limit(stack: Stack) -> None:
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    spec = {"model_name": "deep", "data": {"path": "x.csv"}, "serving": {"promote": deep}}
    with pytest.raises(ApiError) as caught:
        stack.client.submit(spec)
    assert caught.value.status == 422
    assert caught.value.field is not None and caught.value.field.startswith("serving.promote.0")
    assert "nested deeper than 16 levels" in caught.value.message


@pytest.fixture(scope="module")
def outside_secret(stack: Stack) -> Path:
    """A valid dataset just outside the data root: were it read, the job would be accepted."""
    root = stack.settings.resolved_data_root()
    secret = root.parent / "secret.csv"
    read_sentiment("amazon").iloc[:40].to_csv(secret, index=False)
    os.symlink(secret, root / "escape.csv")
    os.symlink(root.parent, root / "escape-dir")
    return secret


@pytest.mark.parametrize(
    "path",
    [
        "../secret.csv",
        "./../secret.csv",
        "uploads/../../secret.csv",
        "%2e%2e%2fsecret.csv",
        "%2E%2E/secret.csv",
        "%252e%252e%252fsecret.csv",
        "%25252e%25252e%25252fsecret.csv",
        "..\\secret.csv",
        "..%5csecret.csv",
        "{absolute}",
        "//{absolute}",
        "file://{absolute}",
        "file:{absolute}",
        "escape.csv",
        "escape-dir/secret.csv",
        "secret.csv\x00.csv",
    ],
)
def test_dataset_paths_outside_the_data_root_are_refused(
    stack: Stack, tiny_model_dir: Path, outside_secret: Path, path: str
) -> None:
    path = path.format(absolute=outside_secret)
    with pytest.raises(ApiError) as caught:
        stack.client.submit(tiny_spec(tiny_model_dir, path, model_name="escape"))
    assert (caught.value.status, caught.value.code) == (400, "path_refused")
    assert caught.value.field == "data.path"
    assert repr(path) in caught.value.message


def test_validation_path_is_guarded_like_the_training_path(
    stack: Stack, tiny_model_dir: Path, reviews: str, outside_secret: Path
) -> None:
    spec = tiny_spec(tiny_model_dir, reviews, model_name="escape")
    spec["data"] = {"path": reviews, "validation_path": "escape.csv"}
    with pytest.raises(ApiError) as caught:
        stack.client.submit(spec)
    assert (caught.value.status, caught.value.field) == (400, "data.validation_path")
    assert "outside the data root" in caught.value.message


CODE_FIELDS = ["entrypoint", "runtime_env", "trust_remote_code", "pip", "working_dir"]


@pytest.mark.parametrize("name", CODE_FIELDS)
@pytest.mark.parametrize("where", ["", "data", "strategy", "hyperparameters", "resources"])
def test_fields_that_would_run_code_are_unknown(
    stack: Stack, tiny_model_dir: Path, reviews: str, where: str, name: str
) -> None:
    spec = tiny_spec(tiny_model_dir, reviews, model_name="code")
    value: Any = {"pip": ["evil"]} if name == "runtime_env" else "python -c 'import os'"
    (spec.setdefault(where, {}) if where else spec)[name] = value
    with pytest.raises(ApiError) as caught:
        stack.client.submit(spec)
    field = f"{where}.{name}".lstrip(".")
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        422,
        "spec_invalid",
        field,
    )
    assert caught.value.message == f"{field}: unknown field; remove it or check its spelling"


def test_base_model_with_pickled_weights_only_is_refused(
    stack: Stack, tiny_model_dir: Path, reviews: str, tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (pickled / item.name).write_bytes(item.read_bytes())
    # A pickle that would run a command when unpickled; it must never be opened.
    (pickled / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    )
    with pytest.raises(ApiError) as caught:
        stack.client.submit(tiny_spec(tiny_model_dir, reviews, base_model=str(pickled)))
    assert (caught.value.status, caught.value.field) == (422, "base_model")
    assert "no .safetensors weights" in caught.value.message
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://example.com/data.csv", "scheme 'ftp' is not allowed"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher' is not allowed"),
        ("http://example.com/data.csv", "scheme 'http' is not allowed"),
        ("https://127.0.0.1:{port}/data.csv", "127.0.0.1 is a loopback address"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("https://10.0.0.1/data.csv", "10.0.0.1 is a private address"),
        ("https://[::ffff:127.0.0.1]/data.csv", "carries 127.0.0.1, a loopback address"),
        ("https://localhost:{port}/data.csv", "is a loopback address"),
    ],
)
def test_dataset_import_refuses_urls_into_our_own_network(
    stack: Stack, url: str, reason: str
) -> None:
    url = url.format(port=stack.settings.api_port)
    response = stack.client.http.post("/v1/datasets/import", json={"url": url})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["code"], error["field"]) == ("url_refused", "url")
    assert reason in error["message"]
    assert repr(url) in error["message"]
