"""The guard on dataset imports, against a real HTTP server on this machine.

The server listens on 127.0.0.1, so a test that needs a hop to succeed allows that one server
explicitly, as an operator would allow an internal mirror; every other address stays guarded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from jobs.data import DataCatalog
from jobs.errors import DatasetInvalid, TooLarge, UrlRefused
from jobs.remote import MAX_REDIRECTS, fetch
from jobs.settings import Settings
from jobs.store import Store

CSV = b"text,label\n" + b"".join(f"row {i},{i % 2}\n".encode() for i in range(20))


class Origin(BaseHTTPRequestHandler):
    """Serves /data.csv, /big.csv (no Content-Length), /to?location=X redirecting to X, and
    /loop redirecting to itself."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path.startswith("/to?location="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/to?location="))
            self.end_headers()
        elif self.path == "/data.csv":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CSV)))
            self.end_headers()
            self.wfile.write(CSV)
        elif self.path == "/big.csv":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(CSV * 100)
        else:
            self.send_error(404)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[str]:
    Origin.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def allowing(settings: Settings, origin: str | None = None, **extra: object) -> Settings:
    allowed = [origin] if origin else []
    update = {"remote_data_allow_http": True, "remote_data_allowed_hosts": allowed, **extra}
    return settings.model_copy(update=update)


def test_a_local_server_is_refused_as_loopback_and_never_contacted(
    settings: Settings, origin: str, tmp_path: Path
) -> None:
    with pytest.raises(UrlRefused) as caught:
        fetch(f"http://{origin}/data.csv", allowing(settings), tmp_path / "out")
    assert caught.value.field == "url"
    assert "127.0.0.1 is a loopback address" in caught.value.message
    assert Origin.requests == []


def test_an_allowed_server_is_fetched(settings: Settings, origin: str, tmp_path: Path) -> None:
    name = fetch(f"http://{origin}/data.csv", allowing(settings, origin), tmp_path / "out")
    assert name == "data.csv"
    assert (tmp_path / "out").read_bytes() == CSV


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://10.0.0.1/data.csv", "10.0.0.1 is a private address"),
        ("http://[::ffff:127.0.0.1]:{port}/data.csv", "carries 127.0.0.1, a loopback address"),
        ("http://localhost:{port}/data.csv", "is a loopback address"),
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("gopher://{origin}/_x", "scheme 'gopher' is not allowed"),
    ],
)
def test_every_redirect_hop_is_checked_again(
    settings: Settings, origin: str, tmp_path: Path, location: str, reason: str
) -> None:
    target = location.format(port=origin.split(":")[1], origin=origin)
    with pytest.raises(UrlRefused) as caught:
        fetch(f"http://{origin}/to?location={target}", allowing(settings, origin), tmp_path / "o")
    assert reason in caught.value.message
    assert caught.value.message.startswith("url '")
    assert Origin.requests == [f"/to?location={target}"]  # the refused hop was never opened


def test_relative_redirects_on_the_allowed_server_are_followed(
    settings: Settings, origin: str, tmp_path: Path
) -> None:
    fetch(f"http://{origin}/to?location=/data.csv", allowing(settings, origin), tmp_path / "o")
    assert (tmp_path / "o").read_bytes() == CSV


def test_redirect_loops_are_bounded(settings: Settings, origin: str, tmp_path: Path) -> None:
    with pytest.raises(UrlRefused, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(f"http://{origin}/loop", allowing(settings, origin), tmp_path / "o")
    assert len(Origin.requests) == MAX_REDIRECTS + 1


def test_http_needs_the_setting(settings: Settings, origin: str, tmp_path: Path) -> None:
    strict = settings.model_copy(update={"remote_data_allowed_hosts": [origin]})
    with pytest.raises(UrlRefused, match="scheme 'http' is not allowed; use https"):
        fetch(f"http://{origin}/data.csv", strict, tmp_path / "o")


def test_a_body_over_the_upload_limit_is_cut_off(
    settings: Settings, origin: str, tmp_path: Path
) -> None:
    small = allowing(settings, origin, max_upload_bytes=len(CSV) * 10)
    with pytest.raises(TooLarge, match=f"over the limit of {len(CSV) * 10} bytes"):
        fetch(f"http://{origin}/big.csv", small, tmp_path / "o")
    tiny = allowing(settings, origin, max_upload_bytes=10)
    with pytest.raises(TooLarge, match=f"is {len(CSV)} bytes; the limit is 10"):
        fetch(f"http://{origin}/data.csv", tiny, tmp_path / "o")


def test_an_error_status_is_named(settings: Settings, origin: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetInvalid, match="answered HTTP 404") as caught:
        fetch(f"http://{origin}/nope.csv", allowing(settings, origin), tmp_path / "o")
    assert caught.value.field == "url"


def test_an_imported_dataset_is_stored_like_an_upload(
    settings: Settings, local_store: Store, origin: str
) -> None:
    catalog = DataCatalog(allowing(settings, origin), local_store)
    dataset = catalog.import_url(f"http://{origin}/data.csv", name="remote")
    assert (dataset.name, dataset.format, dataset.rows) == ("remote", "csv", 20)
    assert (settings.resolved_data_root() / dataset.path).read_bytes() == CSV
    assert [d.id for d in local_store.list_datasets()] == [dataset.id]
