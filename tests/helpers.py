"""Helpers shared by the tests that run twistd as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def twistd_command(*args: str) -> list[str]:
    """C{twistd -n --pidfile= -l - ARGS} with this interpreter and this tree."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "-l",
        "-",
        *args,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"twistd exited early: {proc.stdout.read()!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("twistd did not start listening")


def twistd_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_twistd(cwd: Path, *smtpd_args: str) -> subprocess.Popen:
    """C{twistd smtpd ARGS} in the background; its output piped as text."""
    return subprocess.Popen(
        twistd_command("smtpd", *smtpd_args),
        cwd=cwd,
        env=twistd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def twistd_start_error(cwd: Path, *smtpd_args: str) -> tuple[int, list[str]]:
    """Run C{twistd smtpd ARGS} that should stop at start-up: (status, lines)."""
    proc = subprocess.run(
        twistd_command("smtpd", *smtpd_args),
        cwd=cwd,
        env=twistd_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()


def require_program(name: str) -> None:
    """Skip when C{name} is missing here; in CI (.ci/run installs it) fail."""
    import shutil

    import pytest

    if shutil.which(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing although .ci/run installs it")
        pytest.skip(f"{name} is not installed (apt-get install {name})")


def stop_process(process: subprocess.Popen, grace: float = 10) -> None:
    """Terminate C{process} if it still runs; kill it after C{grace} seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
