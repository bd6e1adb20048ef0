"""Real servers and processes for the tests: started in their own process group, stopped with kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.conftest import project_env


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A command in its own process group (so kill -9 reaches its workers too)."""
    handle = log.open("w")
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """kill -9 of the process and its group."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``url`` answers; fails with the server's log when it died or never answered."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.5)


def mlflow_server(
    folder: Path, port: int, log: Path, artifacts: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A real tracking server on a sqlite store in ``folder`` with proxied artifacts; returns when it answers.

    ``artifacts``: where the server keeps artifacts (default ``folder/artifacts``; e.g. ``s3://bucket``).
    """
    command = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--artifacts-destination", artifacts or str(folder / "artifacts")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job consumers (7 processes on 2 cores)
    server = start(command, folder, {**project_env(folder), **quiet, **(env or {})}, log)
    wait_until_up(f"http://127.0.0.1:{port}/health", server, log)
    return server


def prefect_server(folder: Path, port: int, log: Path) -> subprocess.Popen:
    """A real Prefect server (its own PREFECT_HOME in ``folder``) with its event and automation services."""
    env = {**project_env(folder), "PREFECT_HOME": str(folder / ".prefect")}
    server = start(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], folder, env, log)
    wait_until_up(f"http://127.0.0.1:{port}/api/health", server, log, timeout=180)
    return server


def postgres(folder: Path):
    """A real PostgreSQL from pip (pgserver) in ``folder``; ``.get_uri()`` is its URL, ``.cleanup()`` stops it."""
    import pgserver

    return pgserver.get_server(folder, cleanup_mode="stop")
