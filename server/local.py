"""The local stack: a Ray head on this machine with the tuneloop Serve application on it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from jobs.errors import Unauthorized
from jobs.settings import Settings
from jobs.store import Store
from server.auth import Scope, issue_token, verify

log = logging.getLogger(__name__)

NAMESPACE = "tuneloop"


def ray_executable() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    return str(beside_python) if beside_python.exists() else shutil.which("ray") or "ray"


def head_address(settings: Settings) -> str:
    return settings.ray_address or f"127.0.0.1:{settings.ray_port}"


def connect(settings: Settings) -> None:
    if not ray.is_initialized():
        ray.init(
            address=head_address(settings),
            namespace=NAMESPACE,
            logging_level="WARNING",
            log_to_driver=False,
        )


def start_head(settings: Settings) -> None:
    """Start a Ray head on this machine unless one answers at the configured port already."""
    if settings.ray_address or port_open("127.0.0.1", settings.ray_port):
        connect(settings)
        return
    command = [
        ray_executable(),
        "start",
        "--head",
        f"--port={settings.ray_port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--metrics-export-port={settings.ray_metrics_port}",
    ]
    log.info("starting a local Ray head: %s", " ".join(command))
    subprocess.run(command, check=True, capture_output=True)
    connect(settings)


def port_open(host: str, port: int) -> bool:
    # ray.init waits for a head that is not there, so look before connecting.
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


def ensure_admin_token(settings: Settings) -> bool:
    """Make sure the admin token file under the home holds a token this stack's database
    accepts, making one when it does not; returns whether it made one.

    The file is created readable by its owner only, before the token is written into it.
    """
    path = settings.admin_token_file()
    store = Store.open(settings.resolved_database_url())
    try:
        if path.is_file():
            try:
                verify(path.read_text().strip(), store.find_token)
                return False
            except Unauthorized as exc:
                log.warning("the token in %s is refused (%s); making a new one", path, exc)
        _, plain = issue_token(store, name="local admin", scope=Scope.ADMIN)
    finally:
        store.engine.dispose()
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(plain + "\n")
    return True


def up(settings: Settings, timeout: float = 180) -> str:
    """Start the local stack and return the API's URL once it answers."""
    from server.app import APP_NAME, build_app

    settings.ensure_dirs()
    if ensure_admin_token(settings):
        log.info("admin token written to %s (mode 0600)", settings.admin_token_file())
    start_head(settings)
    serve.start(http_options={"host": settings.api_host, "port": settings.api_port})
    serve.run(
        build_app(settings.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False
    )
    url = f"http://{settings.api_host}:{settings.api_port}"
    wait_healthy(url, timeout)
    return url


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last_error = type(exc).__name__
        time.sleep(1)
    raise TimeoutError(f"tuneloop at {url} not healthy after {timeout:.0f}s ({last_error})")


def down(settings: Settings) -> None:
    """Stop the Serve application and the local Ray head; the database and artifacts stay."""
    if not settings.ray_address:
        ray.shutdown()  # disconnect first, so the head's exit is no surprise to this process
        subprocess.run([ray_executable(), "stop", "--force"], check=False, capture_output=True)
        return
    connect(settings)
    serve.shutdown()
