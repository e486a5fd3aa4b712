#!/usr/bin/env python3
"""Benchmark twisted_smtpd against twisted.mail.smtp and aiosmtpd.

    python bench/run.py                 # default set, ~4 minutes
    python bench/run.py --quick         # ~1-1.5 minutes
    python bench/run.py --scenarios session,10m --repeat 3
    python bench/run.py --profile --scenarios session,10m   # py-spy, twisted_smtpd only

Three servers run side by side, each pinned to CPU 0 (``taskset -c 0``) with
a handler that drops the mail; the load (postfix's ``smtp-source`` and
``bench/loadgen.py``) runs pinned to CPU 1.  Everything listens on
127.0.0.1 only and every step is bounded in time.  See bench/README.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import (  # noqa: E402
    SMTP_SOURCE,
    cpu_busy_seconds,
    cpu_seconds,
    free_port,
    proc_status_kib,
    raise_nofile,
    reset_peak_rss,
    smtp_source_argv,
    window_rate,
)

SERVERS = ("twisted_smtpd", "twisted_mail", "aiosmtpd")
#: optional variants, only with --servers (extra columns in the tables)
EXTRA_SERVERS = ("twisted_smtpd_quiet", "twisted_smtpd_baseline")
LABELS = {
    "twisted_smtpd": "twisted_smtpd",
    "twisted_mail": "twisted.mail",
    "aiosmtpd": "aiosmtpd",
    "twisted_smtpd_quiet": "ts --quiet",
    "twisted_smtpd_baseline": "ts baseline",
}
#: the twisted_smtpd variants, run by twistd from a source tree
TWISTED_SMTPD_VARIANTS = (
    "twisted_smtpd",
    "twisted_smtpd_quiet",
    "twisted_smtpd_baseline",
)
MAX_MESSAGE = 200 * 1024 * 1024

# name -> description; "kind" picks the runner, "unit" the metric
SCENARIOS: dict[str, dict[str, Any]] = {
    "conn": dict(
        title="1 msg/connection, 20 sessions (smtp-source)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-s", "20", "-l", "1000"],
        size=1000,
    ),
    "session": dict(
        title="many msgs/connection, 20 sessions (smtp-source -d)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-d", "-s", "20", "-l", "1000"],
        size=1000,
    ),
    "pipelined": dict(
        title="pipelined transactions, 20 connections (loadgen)",
        kind="loadgen",
        unit="msgs/s",
        higher=True,
        argv=["pipelined", "-c", "20", "--size", "1000"],
    ),
    "100k": dict(
        title="100 KB messages, 10 sessions (smtp-source -d)",
        kind="smtp-source",
        unit="msgs/s",
        higher=True,
        argv=["-d", "-s", "10", "-l", "102400"],
        size=102400,
    ),
    "10m": dict(
        title="10 MB messages, 1 connection (loadgen): DATA MB/s",
        kind="loadgen",
        unit="MB/s",
        higher=True,
        metric="mb_per_s",
        argv=["bulk", "-c", "1", "--size", str(10 * 1024 * 1024)],
    ),
    "idle": dict(
        title="idle connections: RSS increase per connection",
        kind="idle",
        unit="KiB/conn",
        higher=False,
    ),
    "100m": dict(
        title="one 100 MB message: peak RSS increase (twisted_smtpd: Maildir)",
        kind="bigmsg",
        unit="MiB",
        higher=False,
    ),
}
DEFAULT_ORDER = ["conn", "session", "pipelined", "100k", "10m", "idle", "100m"]

#: targets: (scenario, comparison, threshold, description)
MSG_RATE_SCENARIOS = ("conn", "session", "pipelined", "100k")


# -- processes ---------------------------------------------------------------

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
            # Same log observer as the twisted.mail server; the _quiet variant
            # adds --quiet (no line per session or accepted message).
            logging = ["--logger", "bench.servers.devnull_log.observer"]
            quiet = ["--quiet"] if self.name == "twisted_smtpd_quiet" else []
            argv = [
                *twistd(),
                "-n",
                "--pidfile=",
                *logging,
                "smtpd",
                *quiet,
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
        self.proc = spawn(
            pinned(self.opts.server_cpu, self.argv()),
            stdout=self._log,
            stderr=subprocess.STDOUT,
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


# -- throughput scenarios ----------------------------------------------------

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


def run_smtp_source(server: Server, scen: dict, opts: argparse.Namespace) -> dict:
    size = scen["size"]
    argv = pinned(
        opts.client_cpu,
        smtp_source_argv(server.port, "-c", "-m", "100000000", *scen["argv"]),
    )
    events: list[tuple[float, int, int]] = []
    err_path = os.path.join(opts.workdir, "smtp-source.err")
    with open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        sampler = Sampler(
            {"server": server.pid, "client": proc.pid, **others(server)},
            cpus=server_cpus(opts),
        )
        sampler.start()

        def reader() -> None:
            fd = proc.stdout.fileno()  # type: ignore[union-attr]
            tail = b""
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                now = time.monotonic()
                parts = (tail + data).split(b"\r")
                tail = parts.pop()
                for part in parts:
                    part = part.strip()
                    if part.isdigit():
                        n = int(part)
                        events.append((now, n, n * size))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        end = t0 + opts.warmup + opts.duration
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)
        exited_early = proc.poll() is not None
        kill(proc, grace=2.0)
        thread.join(2)
        sampler.stop()
    with open(err_path, "rb") as f:
        stderr = f.read().decode("utf-8", "replace").strip()
    result = window_rate(list(events), t0, opts.warmup, opts.duration)
    add_cpu(result, sampler, scen)
    if exited_early or "fatal" in stderr:
        result["error"] = (stderr.splitlines() or ["smtp-source exited early"])[-1][
            :300
        ]
    return result


def run_loadgen(
    server: Server,
    scen: dict,
    opts: argparse.Namespace,
    extra: Optional[list[str]] = None,
) -> dict:
    max_time = opts.warmup + opts.duration + 60
    argv = pinned(
        opts.client_cpu,
        [
            sys.executable,
            os.path.join(HERE, "loadgen.py"),
            *scen["argv"],
            "--port",
            str(server.port),
            "--warmup",
            str(opts.warmup),
            "--duration",
            str(opts.duration),
            "--max-time",
            str(max_time),
            *(extra or []),
        ],
    )
    proc = spawn(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    sampler = Sampler(
        {"server": server.pid, "client": proc.pid, **others(server)},
        cpus=server_cpus(opts),
    )
    sampler.start()
    try:
        out, err = proc.communicate(timeout=max_time + 20)
    except subprocess.TimeoutExpired:
        kill(proc)
        sampler.stop()
        return {"error": "loadgen timed out", "msgs_per_s": 0.0, "mb_per_s": 0.0}
    sampler.stop()
    kill(proc)
    try:
        result = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {
            "error": f"loadgen failed: {err.decode()[-500:]}",
            "msgs_per_s": 0.0,
            "mb_per_s": 0.0,
        }
    add_cpu(result, sampler, scen)
    if result.get("error_count"):
        result["error"] = "; ".join(result.get("errors", []))[:300]
    return result


# -- memory scenarios --------------------------------------------------------


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


def run_idle(name: str, opts: argparse.Namespace) -> dict:
    server = Server(name, opts).start()
    child = None
    try:
        n = opts.idle_connections
        child = LineChild(
            pinned(
                opts.client_cpu,
                [
                    sys.executable,
                    os.path.join(HERE, "loadgen.py"),
                    "idle",
                    "-c",
                    str(n),
                    "--port",
                    str(server.port),
                    "--max-time",
                    "120",
                ],
            )
        )
        child.expect("WARM", 30)
        time.sleep(0.3)
        rss0 = proc_status_kib(server.pid, "VmRSS")
        child.send("go")
        ready = child.expect("READY", 90).split()
        opened, failed = int(ready[1]), int(ready[2])
        time.sleep(0.5)
        rss1 = max(proc_status_kib(server.pid, "VmRSS") or 0 for _ in range(3))
        child.send("close")
        tail = child.expect("{", 30)
        detail = json.loads(tail)
        result = {
            "kib_per_conn": (rss1 - rss0) / opened if opened else None,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "opened": opened,
            "failed": failed,
            "alive_at_close": detail.get("alive_at_close"),
        }
        if failed or detail.get("error_count"):
            result["error"] = f"{failed} connections failed: {detail.get('errors')}"
        return result
    finally:
        if child is not None:
            kill(child.proc)
        server.stop()


def run_bigmsg(name: str, opts: argparse.Namespace) -> dict:
    maildir = None
    if name == "twisted_smtpd":
        maildir = tempfile.mkdtemp(prefix="maildir-", dir=opts.workdir)
    server = Server(name, opts, maildir=maildir).start()
    try:
        size = opts.big_size
        loadgen = [
            sys.executable,
            os.path.join(HERE, "loadgen.py"),
            "single",
            "--port",
            str(server.port),
            "--warmup",
            "0",
            "--duration",
            "0",
        ]
        # warm-up: one small message through the same code path
        subprocess.run(
            pinned(opts.client_cpu, loadgen + ["--size", "20000", "--max-time", "30"]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        time.sleep(0.3)
        reset = reset_peak_rss(server.pid)
        rss0 = proc_status_kib(server.pid, "VmRSS") or 0
        hwm0 = proc_status_kib(server.pid, "VmHWM") or 0
        t = time.monotonic()
        done = subprocess.run(
            pinned(
                opts.client_cpu, loadgen + ["--size", str(size), "--max-time", "150"]
            ),
            capture_output=True,
            timeout=180,
        )
        elapsed = time.monotonic() - t
        hwm1 = proc_status_kib(server.pid, "VmHWM") or 0
        rss1 = proc_status_kib(server.pid, "VmRSS") or 0
        result: dict[str, Any] = {
            "mib_increase": (hwm1 - rss0) / 1024,
            "rss_before_kib": rss0,
            "hwm_before_kib": hwm0,
            "hwm_after_kib": hwm1,
            "rss_after_kib": rss1,
            "hwm_reset": reset,
            "seconds": elapsed,
            "mb_per_s": size / elapsed / 1e6,
            "handler": "maildir" if maildir else "discard",
        }
        sent = 0
        try:
            detail = json.loads(done.stdout.decode().strip().splitlines()[-1])
            sent = detail.get("total_bytes", 0)
            result["bytes"] = sent
            if detail.get("error_count") or detail.get("total_messages") != 1:
                result["error"] = (
                    "; ".join(detail.get("errors", []))[:300] or "not accepted"
                )
        except (ValueError, IndexError):
            result["error"] = "loadgen failed: " + done.stderr.decode()[-300:]
        if maildir:
            new_dir = os.path.join(maildir, "new")
            sizes = sorted(
                os.path.getsize(os.path.join(new_dir, f)) for f in os.listdir(new_dir)
            )
            result["maildir_sizes"] = sizes
            # the file holds the message plus Return-Path and Received lines
            if not sizes or sizes[-1] < sent:
                result["error"] = (
                    f"Maildir holds {sizes}, expected a file >= {sent} bytes"
                )
        return result
    finally:
        server.stop()
        if maildir:
            shutil.rmtree(maildir, ignore_errors=True)


# -- profiling -----------------------------------------------------------------


def profile(opts: argparse.Namespace, scenarios: list[str]) -> None:
    pyspy = shutil.which("py-spy")
    if not pyspy:
        sys.exit("py-spy not found: pip install py-spy")
    outdir = os.path.join(HERE, "results", "profile")
    os.makedirs(outdir, exist_ok=True)
    summaries: list[str] = []
    for key in scenarios:
        scen = SCENARIOS[key]
        if scen["kind"] not in ("smtp-source", "loadgen"):
            print(f"skip {key}: profiling covers throughput scenarios only")
            continue
        server = Server(opts.profile_server, opts).start()
        try:
            raw = os.path.join(outdir, f"{key}.txt")
            # raw = collapsed stacks (flamegraph.pl / speedscope read them)
            recorder = spawn(
                pinned(
                    opts.client_cpu,
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(server.pid),
                        "--rate",
                        "200",
                        "--duration",
                        str(int(opts.warmup + opts.duration + 1)),
                        "--format",
                        "raw",
                        "--output",
                        raw,
                    ],
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            result = (
                run_smtp_source if scen["kind"] == "smtp-source" else run_loadgen
            )(server, scen, opts)
            try:
                recorder.wait(opts.warmup + opts.duration + 20)
            except subprocess.TimeoutExpired:
                pass
            kill(recorder)
            print(
                f"{key}: {fmt_value(metric_of(key, result))} {scen['unit']}"
                " under py-spy"
                f" (server CPU {pct(result.get('server_cpu'))})"
            )
            if os.path.exists(raw):
                text = (
                    f"== {key}: {SCENARIOS[key]['title']}\n"
                    f"{fmt_value(metric_of(key, result))} {scen['unit']} under py-spy"
                    f" (200 Hz), server CPU {pct(result.get('server_cpu'))},"
                    f" {opts.profile_server} at {git_commit()}\n"
                    + summarize_profile(raw, top=opts.profile_top)
                    + f"\n  stacks: {os.path.relpath(raw, ROOT)}\n"
                )
                print(text)
                summaries.append(text)
        finally:
            server.stop()
    if summaries:
        with open(os.path.join(outdir, "summary.txt"), "w") as f:
            f.write("\n".join(summaries))
        print(f"wrote {os.path.relpath(os.path.join(outdir, 'summary.txt'), ROOT)}")


#: py-spy's leaf frame while the reactor waits in epoll: idle, not work
_IDLE_LEAF = "doPoll (twisted/internet/epollreactor.py:"


def summarize_profile(path: str, top: int = 25) -> str:
    """Self and inclusive shares of the busy samples in py-spy's raw output.

    Samples whose leaf is the reactor's epoll wait count as idle and are left
    out; inclusive shares are per function (any line), self shares per line.
    """
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = busy = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            frames = stack.split(";")
            if _IDLE_LEAF in frames[-1]:
                continue
            busy += count
            seen = set()
            for frame in frames:
                name = frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame
                if name not in seen:
                    incl[name] = incl.get(name, 0) + count
                    seen.add(name)
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
    if not busy:
        return "  (no samples)"
    lines = [
        f"  {total} samples, {busy} busy ({100 * busy / total:.0f}%);"
        " shares below are of the busy samples",
        "  top self time (function (file:line)):",
    ]
    for name, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {100 * count / busy:5.1f}%  {name}")
    lines.append("  top inclusive, twisted_smtpd and logging:")
    shown = 0
    for name, count in sorted(incl.items(), key=lambda kv: -kv[1]):
        if "twisted_smtpd/" in name or "twisted/logger" in name or "email/" in name:
            lines.append(f"    {100 * count / busy:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


# -- reporting -------------------------------------------------------------------


def metric_of(key: str, result: Optional[dict]) -> Optional[float]:
    if not result:
        return None
    kind = SCENARIOS[key]["kind"]
    if kind == "idle":
        return result.get("kib_per_conn")
    if kind == "bigmsg":
        return result.get("mib_increase")
    return result.get(SCENARIOS[key].get("metric", "msgs_per_s"))


def fmt_value(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def median(values: list[float]) -> Optional[float]:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def paired_ratio(key: str, ours: list[dict], theirs: list[dict]) -> Optional[float]:
    """Median over rounds of ours/theirs, each pair measured in the same round.

    The two runs of a round are seconds apart, so a slow drift of the shared
    machine cancels out; best-of and per-CPU figures are taken over minutes.
    """
    by_round = {r.get("round"): r for r in theirs if not r.get("error")}
    ratios = []
    for run in ours:
        other = by_round.get(run.get("round"))
        if other is None or run.get("error"):
            continue
        value = ratio(metric_of(key, run), metric_of(key, other))
        if value is not None:
            ratios.append(value)
    return median(ratios)


def summarize(key: str, runs: list[dict]) -> dict:
    """Best wall-clock figure over the rounds, and the median per CPU-second."""
    good = [r for r in runs if metric_of(key, r) is not None and not r.get("error")]
    pick = max if SCENARIOS[key]["higher"] else min
    chosen = (
        pick(good, key=lambda r: metric_of(key, r))
        if good
        else (runs[-1] if runs else {})
    )
    return {
        "value": metric_of(key, chosen),
        "per_cpu_s": median([r["per_cpu_s"] for r in good if r.get("per_cpu_s")]),
        "server_cpu": chosen.get("server_cpu"),
        "foreign_cpu": chosen.get("foreign_cpu"),
        "samples": [metric_of(key, r) for r in runs],
        "error": next((r["error"] for r in runs if r.get("error")), None),
    }


def table(summary: dict, field: str = "value", keys: Optional[list[str]] = None) -> str:
    extras = [
        x for x in EXTRA_SERVERS if any(x in e["servers"] for e in summary.values())
    ]
    header = [
        "scenario",
        "unit",
        "twisted_smtpd",
        "twisted.mail",
        "aiosmtpd",
        "ts/tm",
        "ts/aio",
    ]
    if field == "value":
        header.append("ts CPU")
    header += [LABELS[x] for x in extras]
    rows = [header]
    for key, entry in summary.items():
        if keys is not None and key not in keys:
            continue
        per = entry["servers"]
        ts, tm, aio = (per.get(s, {}).get(field) for s in SERVERS)
        unit = (
            SCENARIOS[key]["unit"]
            if field == "value"
            else ("msgs/CPU-s" if SCENARIOS[key]["unit"] == "msgs/s" else "MB/CPU-s")
        )
        row = [
            key,
            unit,
            fmt_value(ts),
            fmt_value(tm),
            fmt_value(aio),
            fmt_value(ratio(ts, tm)) + "x" if ratio(ts, tm) else "-",
            fmt_value(ratio(ts, aio)) + "x" if ratio(ts, aio) else "-",
        ]
        if field == "value":
            cpu = per.get("twisted_smtpd", {}).get("server_cpu")
            row.append(pct(cpu) if cpu is not None else "")
        row += [fmt_value(per.get(x, {}).get(field)) for x in extras]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for n, r in enumerate(rows):
        out.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def targets(summary: dict) -> list[dict]:
    """The project's targets, judged on the wall-clock figures and, for the
    throughput ones, also per server CPU-second (robust to a noisy machine)."""
    checks = []

    def get(key: str, server: str, field: str = "value") -> Optional[float]:
        return summary.get(key, {}).get("servers", {}).get(server, {}).get(field)

    def rate_check(key: str, other: str, need: float, what: str) -> None:
        wall = ratio(get(key, "twisted_smtpd"), get(key, other))
        per_cpu = ratio(
            get(key, "twisted_smtpd", "per_cpu_s"), get(key, other, "per_cpu_s")
        )
        paired = summary.get(key, {}).get("paired", {}).get(other)
        checks.append(
            dict(
                target=f"{key}: {what} >= {need:g}x {LABELS[other]}",
                need=need,
                wall=wall,
                per_cpu=per_cpu,
                paired=paired,
                met=wall is not None and wall >= need,
                met_per_cpu=per_cpu is not None and per_cpu >= need,
                shown=f"{fmt_value(wall)}x wall, {fmt_value(per_cpu)}x per CPU-s,"
                f" {fmt_value(paired)}x paired",
            )
        )

    for key in MSG_RATE_SCENARIOS:
        if key in summary:
            rate_check(key, "twisted_mail", 1.5, "msgs/s")
            rate_check(key, "aiosmtpd", 4, "msgs/s")
    if "10m" in summary:
        rate_check("10m", "twisted_mail", 3, "DATA MB/s")
    if "idle" in summary:
        v = get("idle", "twisted_smtpd")
        checks.append(
            dict(
                target="idle: <= 2.5 KiB per connection",
                wall=v,
                met=v is not None and v <= 2.5,
                shown=f"{fmt_value(v)} KiB",
            )
        )
    if "100m" in summary:
        v = get("100m", "twisted_smtpd")
        checks.append(
            dict(
                target="100m: peak RSS increase < 16 MiB (Maildir)",
                wall=v,
                met=v is not None and v < 16,
                shown=f"{fmt_value(v)} MiB",
            )
        )
    return checks


def verdict(check: dict) -> str:
    if "met_per_cpu" not in check:
        return "met" if check["met"] else "NOT met"
    need = check["need"]
    paired = check.get("paired")
    met = {
        "wall": check["met"],
        "per CPU-s": check["met_per_cpu"],
        "paired": paired is not None and paired >= need,
    }
    if all(met.values()):
        return "met"
    if not any(met.values()):
        return "NOT met"
    return "met " + " and ".join(k for k, v in met.items() if v) + " only"


_SHORT = {
    "twisted_smtpd": "ts",
    "twisted_smtpd_quiet": "ts-quiet",
    "twisted_smtpd_baseline": "ts-base",
    "twisted_mail": "tm",
    "aiosmtpd": "aio",
}


def paired_table(results: dict, keys: list[str]) -> str:
    """twisted_smtpd (and --quiet) over each peer, median of same-round ratios."""
    columns = [
        (ours, theirs)
        for ours, theirs in [
            ("twisted_smtpd", "twisted_smtpd_baseline"),
            *(
                (ours, theirs)
                for ours in ("twisted_smtpd", "twisted_smtpd_quiet")
                for theirs in ("twisted_mail", "aiosmtpd")
            ),
        ]
        if any(ours in results[k] and theirs in results[k] for k in keys)
    ]
    rows = [["scenario", *(f"{_SHORT[a]}/{_SHORT[b]}" for a, b in columns)]]
    for key in keys:
        row = [key]
        for ours, theirs in columns:
            runs = results[key]
            if ours in runs and theirs in runs:
                row.append(fmt_value(paired_ratio(key, runs[ours], runs[theirs])) + "x")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="short windows, one round (~1-1.5 min)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_ORDER),
        help=f"comma-separated subset of {','.join(DEFAULT_ORDER)}",
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma-separated subset of "
        + ",".join(SERVERS)
        + f" (optional extra: {','.join(EXTRA_SERVERS)})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds of each throughput scenario; the best is reported"
        " [default 3, --quick 1]",
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="seconds [1.0, quick 0.5]"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="measured seconds per run [2.5, quick 2.0]",
    )
    p.add_argument("--idle-connections", type=int, default=2000)
    p.add_argument(
        "--big-size",
        type=int,
        default=100 * 1024 * 1024,
        help="bytes of the one big message [100 MiB]",
    )
    p.add_argument(
        "--server-cpu", default="0", help="taskset CPU list for servers ('' = no pin)"
    )
    p.add_argument("--client-cpu", default="1", help="taskset CPU list for the load")
    p.add_argument(
        "--json",
        default=os.path.join(HERE, "results", "latest.json"),
        help="where to write the results ('' = nowhere)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of comparing, profile twisted_smtpd with py-spy"
        " under the chosen throughput scenarios",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="source tree of another twisted_smtpd (e.g. a git worktree) to run"
        " as the twisted_smtpd_baseline server, to A/B a change in one run",
    )
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument(
        "--profile-server",
        default="twisted_smtpd",
        choices=("twisted_smtpd", "twisted_smtpd_quiet"),
        help="which variant --profile attaches to",
    )
    opts = p.parse_args(argv)
    opts.repeat = opts.repeat or (1 if opts.quick else 3)
    opts.warmup = (
        opts.warmup if opts.warmup is not None else (0.5 if opts.quick else 1.0)
    )
    opts.duration = (
        opts.duration if opts.duration is not None else (2.0 if opts.quick else 2.5)
    )
    opts.scenario_list = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    opts.server_list = [s.strip() for s in opts.servers.split(",") if s.strip()]
    for s in opts.scenario_list:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(DEFAULT_ORDER)}")
    for s in opts.server_list:
        if s not in SERVERS + EXTRA_SERVERS:
            p.error(
                f"unknown server {s!r};"
                f" choose from {', '.join(SERVERS + EXTRA_SERVERS)}"
            )
    if "twisted_smtpd_baseline" in opts.server_list:
        if not opts.baseline or not os.path.isdir(
            os.path.join(opts.baseline, "twisted_smtpd")
        ):
            p.error("twisted_smtpd_baseline needs --baseline DIR (a source tree)")
        opts.baseline = os.path.abspath(opts.baseline)
    return opts


def preflight(opts: argparse.Namespace) -> None:
    if (opts.server_cpu or opts.client_cpu) and not shutil.which("taskset"):
        sys.exit(
            "taskset not found (util-linux); or pass --server-cpu '' --client-cpu ''"
        )
    needs_source = any(
        SCENARIOS[s]["kind"] == "smtp-source" for s in opts.scenario_list
    )
    if needs_source and not os.access(SMTP_SOURCE, os.X_OK):
        sys.exit(
            "smtp-source not found: sh bench/setup.sh"
            "  (installs postfix, keeps it stopped)"
        )
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        print(
            "warning: fewer than 2 CPUs; server and load share a core", file=sys.stderr
        )


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


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    preflight(opts)
    raise_nofile()
    try:
        os.sched_setaffinity(
            0,
            {int(c) for c in opts.client_cpu.split(",")}
            if opts.client_cpu
            else os.sched_getaffinity(0),
        )
    except (OSError, ValueError):
        pass
    opts.workdir = tempfile.mkdtemp(prefix="smtpd-bench-")

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        if opts.profile:
            profile(opts, opts.scenario_list)
            return 0
        return compare(opts, started)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        kill_all()
        shutil.rmtree(opts.workdir, ignore_errors=True)


def compare(opts: argparse.Namespace, started: float) -> int:
    servers = opts.server_list
    commit = git_commit()  # the code under test is the work tree, as it is now
    print(
        f"servers on CPU {opts.server_cpu or 'any'},"
        f" load on CPU {opts.client_cpu or 'any'};"
        f" {opts.repeat} round(s) of {opts.warmup}s warm-up + {opts.duration}s"
    )
    results: dict[str, dict[str, list[dict]]] = {}
    throughput = [
        s
        for s in opts.scenario_list
        if SCENARIOS[s]["kind"] in ("smtp-source", "loadgen")
    ]
    memory = [s for s in opts.scenario_list if s not in throughput]

    if throughput:
        running = RUNNING
        running.clear()
        running.update({name: Server(name, opts).start() for name in servers})
        try:
            for key in throughput:
                scen = SCENARIOS[key]
                results[key] = {name: [] for name in servers}
                for rnd in range(opts.repeat):
                    order = (
                        servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                    )
                    for name in order:
                        server = running[name]
                        if not server.alive():
                            print(f"  {name} died; restarting:\n{server.log_tail(500)}")
                            server.stop()
                            server = running[name] = Server(name, opts).start()
                        runner: Callable = (
                            run_smtp_source
                            if scen["kind"] == "smtp-source"
                            else run_loadgen
                        )
                        res = runner(server, scen, opts)
                        res["round"] = rnd
                        results[key][name].append(res)
                        print(
                            f"  {key:<9} {LABELS[name]:<14}"
                            f" {fmt_value(metric_of(key, res)):>9} {scen['unit']:<8}"
                            f" server CPU {pct(res.get('server_cpu')):>4},"
                            f" client CPU {pct(res.get('client_cpu')):>4}"
                            f" others on core {pct(res.get('foreign_cpu')):>4}"
                            f"  {fmt_value(res.get('per_cpu_s')):>7}/CPU-s"
                            + (f"  ERROR {res['error']}" if res.get("error") else ""),
                            flush=True,
                        )
                        time.sleep(0.3)
        finally:
            for server in running.values():
                server.stop()

    for key in memory:
        results[key] = {name: [] for name in servers}
        for name in servers:
            res = (run_idle if SCENARIOS[key]["kind"] == "idle" else run_bigmsg)(
                name, opts
            )
            results[key][name].append(res)
            print(
                f"  {key:<9} {LABELS[name]:<14} {fmt_value(metric_of(key, res)):>9}"
                f" {SCENARIOS[key]['unit']:<8}"
                + (f"  ERROR {res['error']}" if res.get("error") else ""),
                flush=True,
            )

    summary: dict[str, dict] = {}
    for key in opts.scenario_list:
        summary[key] = {
            "title": SCENARIOS[key]["title"],
            "unit": SCENARIOS[key]["unit"],
            "higher_is_better": SCENARIOS[key]["higher"],
            "servers": {
                name: summarize(key, runs) for name, runs in results[key].items()
            },
        }
        if "twisted_smtpd" in results[key]:
            summary[key]["paired"] = {
                other: paired_ratio(key, results[key]["twisted_smtpd"], runs)
                for other, runs in results[key].items()
                if other != "twisted_smtpd"
            }
    elapsed = time.monotonic() - started
    print()
    print(table(summary))
    print(
        "(ts = twisted_smtpd, tm = twisted.mail.  Throughput rows: best of"
        f" {opts.repeat} round(s), higher is better; idle/100m: lower is better."
        "  'ts CPU': share of its core twisted_smtpd got)"
    )
    if throughput:
        print(
            "\nPer server CPU-second"
            " (median of rounds; insensitive to other load on the core):"
        )
        print(table(summary, "per_cpu_s", throughput))
        print(
            "\nPaired: median over rounds of the ratio of two runs in the same round"
            " (seconds apart, so slow drift of the machine cancels):"
        )
        print(paired_table(results, throughput))
    noisy = [
        f"{key}/{LABELS[name]} {pct(v['foreign_cpu'])}"
        for key, entry in summary.items()
        for name, v in entry["servers"].items()
        if (v.get("foreign_cpu") or 0) > 0.15
    ]
    if noisy:
        print(
            "\nnote: other processes took CPU from the server core during: "
            + ", ".join(noisy)
        )
    errors = [
        f"{key}/{LABELS[name]}: {v['error']}"
        for key, entry in summary.items()
        for name, v in entry["servers"].items()
        if v.get("error")
    ]
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors))
    checks = targets(summary)
    if checks:
        print("\nTargets:")
        for c in checks:
            print(f"  [{verdict(c)}] {c['target']}: {c['shown']}")
    print(f"\ntotal {elapsed:.0f}s")

    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        doc = {
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": commit,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "settings": {
                k: getattr(opts, k)
                for k in (
                    "repeat",
                    "warmup",
                    "duration",
                    "idle_connections",
                    "big_size",
                    "server_cpu",
                    "client_cpu",
                    "quick",
                    "baseline",
                )
            },
            "versions": versions(),
            "elapsed_s": elapsed,
            "summary": summary,
            "targets": checks,
            "runs": results,
        }
        with open(opts.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False, default=str)
        print(f"wrote {os.path.relpath(opts.json)}")
    return 0


def versions() -> dict:
    out = {}
    for mod in ("twisted", "aiosmtpd"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    try:
        out["postfix"] = (
            subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", "postfix"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            or None
        )
    except Exception:
        out["postfix"] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
