"""The local stack: a Ray head on this machine with the tuneloop Serve application on it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
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
    """Stop the Serve application and the local Ray head; the database and artifacts stay.

    Only the head at the configured port goes, with its processes: another Ray cluster on
    this machine, say a notebook's, is left running.
    """
    if not settings.ray_address:
        if not port_open("127.0.0.1", settings.ray_port):
            log.info("no Ray head answers on port %d; nothing to stop", settings.ray_port)
            return
        connect(settings)
        session = ray.get_runtime_context().get_session_name()
        ray.shutdown()  # disconnect first, so the head's exit is no surprise to this process
        stop_cluster(session)
        return
    connect(settings)
    serve.shutdown()


def cluster_processes(session: str) -> list[int]:
    """The processes of the Ray cluster of ``session`` on this machine: those whose command
    line holds the session's folder (its GCS, raylet, agents and monitors), and everything
    they started (the workers, which rename themselves ``ray::…``)."""
    parents: dict[int, int] = {}
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended while we looked
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if session.encode() in command:
            found.add(pid)
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return sorted(found)
        found |= children


def stop_cluster(session: str, grace_seconds: float = 15) -> None:
    """Stop one Ray cluster's processes: SIGTERM, then SIGKILL for those still there after
    the grace period. Without /proc (not Linux) it falls back to ``ray stop``, which stops
    every Ray process of the machine."""
    if not Path("/proc/self/stat").exists():
        log.warning("no /proc here: stopping every Ray process of this machine with ray stop")
        subprocess.run([ray_executable(), "stop", "--force"], check=False, capture_output=True)
        return
    pids = cluster_processes(session)
    log.info("stopping Ray cluster %s: %d processes", session, len(pids))
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.2)
    left = [pid for pid in pids if running(pid)]
    if left:
        log.warning(
            "%d Ray processes still there after %gs; killing them", len(left), grace_seconds
        )
        signal_all(left, signal.SIGKILL)


def signal_all(pids: list[int], number: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, number)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie waiting for its parent counts as ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
