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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import SMTP_SOURCE, raise_nofile  # noqa: E402
from _process import (  # noqa: E402
    DEFAULT_SERVERS,
    EXTRA_SERVERS,
    LABELS,
    RUNNING,
    SERVERS,
    Server,
    git_commit,
    kill_all,
)
from profiling import profile  # noqa: E402
from report import (  # noqa: E402
    fmt_value,
    metric_of,
    paired_ratio,
    paired_table,
    pct,
    summarize,
    table,
    targets,
    verdict,
)
from scenarios import (  # noqa: E402
    DEFAULT_ORDER,
    SCENARIOS,
    run_bigmsg,
    run_idle,
    run_loadgen,
    run_smtp_source,
)


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
        default=",".join(DEFAULT_SERVERS),
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
    p.add_argument(
        "--baseline-quiet",
        action="store_true",
        help="run twisted_smtpd_baseline with --quiet (to A/B against"
        " twisted_smtpd_quiet like for like)",
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
        summary[key]["paired"] = {
            (ours, other): paired_ratio(key, results[key][ours], runs)
            for ours in (
                "twisted_smtpd",
                "twisted_smtpd_textlog",
                "twisted_smtpd_quiet",
            )
            if ours in results[key]
            for other, runs in results[key].items()
            if other != ours
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
            "summary": _json_keys(summary),
            "targets": checks,
            "runs": results,
        }
        with open(opts.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=False, default=str)
        print(f"wrote {os.path.relpath(opts.json)}")
    return 0


def _json_keys(value: Any) -> Any:
    """The summary with its (ours, other) pair keys written as "ours/other"."""
    if isinstance(value, dict):
        return {
            "/".join(k) if isinstance(k, tuple) else k: _json_keys(v)
            for k, v in value.items()
        }
    return value


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
