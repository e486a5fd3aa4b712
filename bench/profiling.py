"""py-spy profiles of twisted_smtpd under the throughput scenarios."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from _process import Server, git_commit, kill, pinned, spawn  # noqa: E402
from report import fmt_value, metric_of, pct  # noqa: E402
from scenarios import SCENARIOS, run_loadgen, run_smtp_source  # noqa: E402


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
