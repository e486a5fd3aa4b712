"""Process control for the benchmarks: servers, load children, CPU sampling."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from _common import cpu_busy_seconds, cpu_seconds, free_port  # noqa: E402

SERVERS = ("twisted_smtpd", "twisted_mail", "aiosmtpd")


#: optional variants, only with --servers (extra columns in the tables)
EXTRA_SERVERS = (
    "twisted_smtpd_quiet",
    "twisted_smtpd_textlog",
    "twisted_smtpd_baseline",
    "floor",
)


#: what a plain run compares: the peers, --quiet (like for like, since the
#: peers log nothing per message) and the floor (a reference, not a peer)
DEFAULT_SERVERS = (*SERVERS, "twisted_smtpd_quiet", "floor")
LABELS = {
    "twisted_smtpd": "twisted_smtpd",
    "twisted_mail": "twisted.mail",
    "aiosmtpd": "aiosmtpd",
    "twisted_smtpd_quiet": "ts --quiet",
    "twisted_smtpd_textlog": "ts textlog",
    "twisted_smtpd_baseline": "ts baseline",
    "floor": "Twisted floor*",
}


#: the twisted_smtpd variants, run by twistd from a source tree
TWISTED_SMTPD_VARIANTS = (
    "twisted_smtpd",
    "twisted_smtpd_quiet",
    "twisted_smtpd_textlog",
    "twisted_smtpd_baseline",
)


MAX_MESSAGE = 200 * 1024 * 1024


_CHILDREN: list[subprocess.Popen] = []


def spawn(argv: list[str], **kw: Any) -> subprocess.Popen:
    """Start a child in its own process group (so it can be killed whole)."""
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    _CHILDREN.append(proc)
    return proc


def kill(proc: Optional[subprocess.Popen], grace: float = 5.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def kill_all() -> None:
    for proc in list(_CHILDREN):
        kill(proc, grace=2.0)


def twistd() -> list[str]:
    """The twistd of this interpreter (its PID is the server's)."""
    local = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(local, os.X_OK):
        return [local]
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run;"
        " sys.argv[0] = 'twistd'; run()",
    ]


def pinned(cpu: Optional[str], argv: list[str]) -> list[str]:
    return (["taskset", "-c", cpu] + argv) if cpu else argv


class Server:
    """One server process, pinned, on 127.0.0.1:<free port>."""

    def __init__(
        self, name: str, opts: argparse.Namespace, maildir: Optional[str] = None
    ):
        self.name = name
        self.opts = opts
        self.maildir = maildir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(opts.workdir, f"{name}-{self.port}.log")

    def argv(self) -> list[str]:
        py = sys.executable
        if self.name in TWISTED_SMTPD_VARIANTS:
            # As a user runs it: twistd -n, its log on standard output (which
            # start() points at os.devnull), through the plugin's default
            # observer (twisted_smtpd.fastlog).  _quiet adds --quiet (no line
            # per session or accepted message); _textlog logs the same lines
            # through twistd's own text observer (--twistd-log).
            variant = {
                "twisted_smtpd_quiet": ["--quiet"],
                "twisted_smtpd_textlog": ["--twistd-log"],
                "twisted_smtpd_baseline": (
                    ["--quiet"] if getattr(self.opts, "baseline_quiet", False) else []
                ),
            }.get(self.name, [])
            argv = [
                *twistd(),
                "-n",
                "--pidfile=",
                "smtpd",
                *variant,
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
                "--hostname",
                "bench.local",
                "--max-message-size",
                str(MAX_MESSAGE),
            ]
            if self.maildir:
                argv += ["--maildir", self.maildir]
            else:
                argv += ["--handler", "twisted_smtpd.handlers.discard"]
            return argv
        if self.name == "twisted_mail":
            return [
                py,
                os.path.join(HERE, "servers", "twisted_mail_server.py"),
                "--port",
                str(self.port),
            ]
        if self.name == "floor":
            return [
                py,
                os.path.join(HERE, "servers", "floor_server.py"),
                "--port",
                str(self.port),
            ]
        if self.name == "aiosmtpd":
            return [
                py,
                os.path.join(HERE, "servers", "aiosmtpd_server.py"),
                "--port",
                str(self.port),
                "--max-message-size",
                str(MAX_MESSAGE),
            ]
        raise ValueError(self.name)

    def start(self) -> Server:
        env = dict(os.environ)
        # The baseline's package comes first; bench/ (the log observer) from here.
        tree = (
            [self.opts.baseline, ROOT]
            if self.name == "twisted_smtpd_baseline"
            else [ROOT]
        )
        env["PYTHONPATH"] = os.pathsep.join(
            tree + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self._log = open(self.log_path, "wb")
        # twistd -n logs to standard output: the log lines are written (and
        # paid for) but not kept; start-up errors (stderr) are.
        logs_to_stdout = self.name in TWISTED_SMTPD_VARIANTS
        self.proc = spawn(
            pinned(self.opts.server_cpu, self.argv()),
            stdout=subprocess.DEVNULL if logs_to_stdout else self._log,
            stderr=self._log if logs_to_stdout else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.opts.workdir,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    banner = s.recv(512)
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(
            f"{self.name} did not answer on port {self.port}:\n{self.log_tail()}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        kill(self.proc)
        self.proc = None
        try:
            self._log.close()
        except Exception:
            pass


class Sampler(threading.Thread):
    """Samples the CPU time of some processes every 50 ms."""

    def __init__(
        self,
        pids: dict[str, int],
        interval: float = 0.05,
        cpus: Optional[list[int]] = None,
    ) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.cpus = cpus or []
        self.interval = interval
        self.samples: list[tuple[float, dict[str, Optional[float]]]] = []
        self._stop_event = threading.Event()

    def add(self, key: str, pid: int) -> None:
        self.pids = {**self.pids, key: pid}

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def sample(self) -> None:
        values = {k: cpu_seconds(p) for k, p in self.pids.items()}
        if self.cpus:
            values["core"] = cpu_busy_seconds(self.cpus)
        self.samples.append((time.monotonic(), values))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        self.sample()

    def cpu_share(self, key: str, t_a: float, t_b: float) -> Optional[float]:
        """Fraction of one CPU used by ``key`` between t_a and t_b."""
        before = [s for s in self.samples if s[0] <= t_a and s[1].get(key) is not None]
        after = [s for s in self.samples if s[0] >= t_b and s[1].get(key) is not None]
        if not before or not after:
            inside = [s for s in self.samples if s[1].get(key) is not None]
            if len(inside) < 2:
                return None
            before, after = inside[:1], inside[-1:]
        (ta, ca), (tb, cb) = (
            (before[-1][0], before[-1][1][key]),
            (after[0][0], after[0][1][key]),
        )
        if tb <= ta:
            return None
        return (cb - ca) / (tb - ta)


#: servers running side by side (watched for CPU they should not be using)
RUNNING: dict[str, Server] = {}


def server_cpus(opts: argparse.Namespace) -> list[int]:
    try:
        return [int(c) for c in opts.server_cpu.split(",")] if opts.server_cpu else []
    except ValueError:
        return []


def others(server: Server) -> dict[str, int]:
    return {
        f"other:{s.name}": s.pid
        for s in RUNNING.values()
        if s is not server and s.alive()
    }


def add_cpu(result: dict, sampler: Sampler, scen: dict) -> None:
    t_a, t_b = result["t_a"], result["t_b"]
    result["server_cpu"] = sampler.cpu_share("server", t_a, t_b)
    result["client_cpu"] = sampler.cpu_share("client", t_a, t_b)
    idle_servers = [
        sampler.cpu_share(k, t_a, t_b) for k in sampler.pids if k.startswith("other:")
    ]
    result["other_servers_cpu"] = sum(v for v in idle_servers if v is not None)
    core = sampler.cpu_share("core", t_a, t_b)
    if core is not None and result["server_cpu"] is not None:
        # CPU time on the server's core(s) that went to other processes
        result["foreign_cpu"] = max(
            0.0, core - result["server_cpu"] - result["other_servers_cpu"]
        )
    if result["server_cpu"]:
        result["per_cpu_s"] = (
            result.get(scen.get("metric", "msgs_per_s"), 0.0) / result["server_cpu"]
        )


class LineChild:
    """A child that speaks in lines on stdin/stdout, read with a timeout."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = spawn(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line.decode().rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {prefix!r} from {self.proc.args}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read().decode()[-500:]  # type: ignore[union-attr]
                raise RuntimeError(f"child exited before {prefix!r}: {err}")
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]


def git_commit() -> Optional[str]:
    """HEAD, with a '+dirty' mark if twisted_smtpd/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "twisted_smtpd"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except Exception:
        return None
