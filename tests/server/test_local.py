"""`tuneloop down` stops the local stack's Ray head and nothing else."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from server.local import cluster_processes, port_open, ray_executable, running
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def session_of_head(port: int) -> str:
    """The session name of the Ray head whose GCS listens on ``port``, from its command line."""
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            command = entry.read_bytes().decode(errors="replace")
            if f"--gcs_server_port={port}" in command:
                found = re.search(r"session_[0-9_-]+", command)
                assert found, command
                return found.group(0)
    raise AssertionError(f"no Ray GCS process on port {port}")


def test_down_stops_its_own_head_and_leaves_other_clusters_running(
    ray_cluster: None, tmp_path: Path
) -> None:
    port = free_port()
    environment = {
        **os.environ,
        "TUNELOOP_HOME": str(tmp_path / "home"),
        "TUNELOOP_RAY_PORT": str(port),
        "RAY_AUTH_MODE": "token",
    }
    head = [f"--port={port}", f"--metrics-export-port={free_port()}", "--disable-usage-stats"]
    started = subprocess.run(
        [ray_executable(), "start", "--head", *head, "--include-dashboard=false"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr
    session = session_of_head(port)
    processes = cluster_processes(session)
    assert processes, f"no processes found for {session}"
    our_raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid

    stopped = subprocess.run(
        [str(Path(sys.executable).with_name("tuneloop")), "down"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stopped.returncode == 0, stopped.stderr
    assert "tuneloop is down" in stopped.stdout
    assert not port_open("127.0.0.1", port)
    assert not any(map(running, processes)), [pid for pid in processes if running(pid)]

    # The session's own cluster, another Ray cluster on this machine, still answers.
    assert running(our_raylet)
    assert ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60) == 42
