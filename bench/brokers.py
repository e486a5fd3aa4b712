"""Messages/s through each broker hand-off, with the engine's ack per message.

    python bench/brokers.py                       # amqp, redis, nats, discard
    python bench/brokers.py --messages 5000 --engines amqp,nats

For each engine: a private server (as the tests start them), one
``twistd -n smtpd --quiet --deliver TARGET`` pinned to --server-cpu, and
postfix's smtp-source pinned to --client-cpu sending --messages messages of
--size bytes over --sessions concurrent sessions (``-d``: several messages
per session).  smtp-source stops at the first non-2xx reply, so a finished
run means every message got its 250, which each engine only allows after its
ack; the count in the engine is checked afterwards.  Reported: messages/s
(wall clock) and messages per CPU-second of the smtpd process (the "per
core" figure).  The engine runs unpinned (it shares the client's CPU on a
2-core machine).  Every step has a timeout; everything started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import cpu_seconds, smtp_source_argv  # noqa: E402
from tests import brokers  # noqa: E402
from tests.helpers import free_port, twistd_command, twistd_env, wait_for_port  # noqa: E402


def _taskset(cpus: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


class Engine:
    name = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server = None

    def start(self) -> str:
        """Start the engine; the --deliver target."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def smtpd_args(self) -> list[str]:
        return []

    def after_load(self, expected: int, result: dict) -> None:
        """Runs once the load is done (before the count is checked)."""

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class AMQP(Engine):
    name = "amqp"

    def start(self) -> str:
        self.server = brokers.start_rabbitmq(self.directory)
        brokers.rabbit_queue(self.server.port, "bench")
        return f"amqp://127.0.0.1:{self.server.port}/?routing_key=bench"

    def count(self) -> int:
        import pika

        params = pika.ConnectionParameters("127.0.0.1", self.server.port)
        with pika.BlockingConnection(params) as connection:
            declared = connection.channel().queue_declare("bench", passive=True)
            return declared.method.message_count


class Redis(Engine):
    name = "redis"

    def start(self) -> str:
        self.server = brokers.start_redis(self.directory)
        return f"redis://127.0.0.1:{self.server.port}/0?stream=bench"

    def count(self) -> int:
        import redis

        with redis.Redis(port=self.server.port) as client:
            return client.xlen("bench")


class NATS(Engine):
    name = "nats"

    def start(self) -> str:
        self.server = brokers.start_nats(self.directory)
        return f"nats://127.0.0.1:{self.server.port}?subject=bench.in&stream=BENCH"

    def count(self) -> int:
        import nats

        async def count() -> int:
            client = await nats.connect(f"nats://127.0.0.1:{self.server.port}")
            try:
                info = await client.jetstream().stream_info("BENCH")
                return info.state.messages
            finally:
                await client.close()

        return asyncio.run(count())


class AMQPSpool(AMQP):
    """RabbitMQ unreachable (a cut relay) with --spool: every message is
    fsynced into the spool; then the relay is restored and the spool drains."""

    name = "amqp-spool"

    def start(self) -> str:
        super().start()
        self.relay = brokers.TCPRelay(self.server.port)
        self.relay.cut()
        return f"amqp://127.0.0.1:{self.relay.port}/?routing_key=bench"

    def smtpd_args(self) -> list[str]:
        return ["--spool", str(self.directory / "spool")]

    def after_load(self, expected: int, result: dict) -> None:
        self.relay.restore()
        deadline = time.monotonic() + 300
        # The publisher reconnects on its back-off (up to 30 s); the drain
        # rate is measured from the first message that arrives.
        while (first := self.count()) == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: the publisher did not reconnect")
            time.sleep(0.01)
        started = time.monotonic()
        while self.count() < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: the spool did not drain")
            time.sleep(0.2)  # each count is a new AMQP connection
        seconds = time.monotonic() - started
        result["drain_msgs_per_s"] = round((expected - first) / seconds, 1)

    def stop(self) -> None:
        self.relay.close()
        super().stop()


class Discard(Engine):
    """No hand-off: the same server with --handler discard, for scale."""

    name = "discard"

    def start(self) -> str:
        return ""

    def count(self) -> int:
        return -1


ENGINES = {e.name: e for e in (AMQP, Redis, NATS, AMQPSpool, Discard)}


def run_one(engine: Engine, args: argparse.Namespace) -> dict:
    target = engine.start()
    port = free_port()
    where = (
        ["--deliver", target]
        if target
        else ["--handler", "twisted_smtpd.handlers.discard"]
    ) + engine.smtpd_args()
    log = open(engine.directory / "twistd.log", "w")
    smtpd = subprocess.Popen(
        _taskset(
            args.server_cpu,
            twistd_command(
                "smtpd", "--quiet", "--port", f"tcp:{port}:interface=127.0.0.1", *where
            ),
        ),
        cwd=engine.directory,
        env=twistd_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_for_port(port, smtpd)
        time.sleep(1.0)  # the publisher connects once the reactor runs

        def load(messages: int) -> float:
            argv = _taskset(
                args.client_cpu,
                smtp_source_argv(
                    port,
                    "-d",
                    "-s",
                    str(args.sessions),
                    "-m",
                    str(messages),
                    "-l",
                    str(args.size),
                ),
            )
            started = time.monotonic()
            done = subprocess.run(argv, timeout=300, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{engine.name}: smtp-source failed: {done.stderr}")
            return time.monotonic() - started

        load(args.warmup)
        cpu_before = cpu_seconds(smtpd.pid) or 0.0
        seconds = load(args.messages)
        cpu = (cpu_seconds(smtpd.pid) or 0.0) - cpu_before
        expected = args.warmup + args.messages
        result: dict = {}
        engine.after_load(expected, result)
        held = engine.count()
        if held >= 0 and held != expected:
            raise SystemExit(
                f"{engine.name}: {held} messages held, expected {expected}"
            )
        return {
            **result,
            "engine": engine.name,
            "messages": args.messages,
            "seconds": round(seconds, 3),
            "msgs_per_s": round(args.messages / seconds, 1),
            "smtpd_cpu_s": round(cpu, 3),
            "msgs_per_cpu_s": round(args.messages / cpu, 1) if cpu else None,
            "held_in_engine": held,
        }
    finally:
        smtpd.terminate()
        try:
            smtpd.wait(20)
        except subprocess.TimeoutExpired:
            smtpd.kill()
            smtpd.wait()
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="amqp,redis,nats,amqp-spool,discard")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", default="1")
    parser.add_argument(
        "--json", default=str(ROOT / "bench" / "results" / "brokers.json")
    )
    args = parser.parse_args()
    os.environ.pop("CI", None)
    results = []
    for name in args.engines.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            result = run_one(ENGINES[name](Path(tmp)), args)
        results.append(result)
        print(
            f"{result['engine']:8} {result['msgs_per_s']:8.1f} msgs/s"
            f"  {result['msgs_per_cpu_s'] or 0:8.1f} msgs per smtpd CPU-second"
            f"  ({result['messages']} x {args.size} B, {args.sessions} sessions)"
            + (
                f"; spool drained at {result['drain_msgs_per_s']} msgs/s"
                if "drain_msgs_per_s" in result
                else ""
            ),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
