"""A small asyncio SMTP load generator for what smtp-source cannot do.

Modes (all time-bounded, loopback only):

``pipelined``
    C connections; each sends the whole transaction at once as RFC 2920
    allows: ``<body> . MAIL RCPT DATA`` in one write, then reads the four
    replies.  One round trip per message.
``bulk``
    C connections sending messages of SIZE bytes back to back (MAIL, RCPT and
    DATA pipelined, then the body after 354).  For DATA throughput.
``single``
    One message of SIZE bytes, streamed in 1 MiB chunks with flow control.
``idle``
    Opens N connections (greeting + EHLO each) and keeps them open until told
    to close on stdin.  Talks to run.py with lines on stdout/stdin:
    ``WARM`` (after a warm-up of 20 short sessions), then on ``go`` opens the
    connections and prints ``READY <open> <failed>``, then closes them all on
    ``close`` (or EOF) and prints the JSON result.

The result is one JSON object on stdout (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import message_body, raise_nofile, window_rate  # noqa: E402

TXN = b"MAIL FROM:<bench@bench.local>\r\nRCPT TO:<sink@bench.local>\r\nDATA\r\n"
EHLO = b"EHLO loadgen.bench.local\r\n"


class SMTPError(Exception):
    pass


class Client(asyncio.Protocol):
    """Counts final reply lines; ``expect(n)`` waits for the next n replies."""

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self._buf = b""
        self._codes: list[int] = []
        self._want = 0
        self._waiter: Optional[asyncio.Future] = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = asyncio.get_running_loop().create_future()

    # asyncio.Protocol
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        while True:
            end = buf.find(b"\r\n", start)
            if end < 0:
                break
            if end - start >= 3 and buf[start + 3 : start + 4] != b"-":
                self._codes.append(int(buf[start : start + 3]))
            start = end + 2
        self._buf = buf[start:]
        if self._waiter is not None and len(self._codes) >= self._want:
            waiter, self._waiter = self._waiter, None
            codes, self._codes = self._codes[: self._want], self._codes[self._want :]
            if not waiter.done():
                waiter.set_result(codes)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(SMTPError(f"connection lost: {exc}"))
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # API
    def expect(self, n: int) -> asyncio.Future[list[int]]:
        fut = asyncio.get_running_loop().create_future()
        if len(self._codes) >= n:
            codes, self._codes = self._codes[:n], self._codes[n:]
            fut.set_result(codes)
        else:
            self._want = n
            self._waiter = fut
        return fut

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        await self._writable.wait()


def check(codes: list[int], expected: tuple[int, ...], what: str) -> None:
    if tuple(codes) != expected:
        raise SMTPError(f"{what}: expected {expected}, got {codes}")


async def connect(host: str, port: int, ehlo: bool = True) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, host, port)
    check(await client.expect(1), (220,), "greeting")
    if ehlo:
        client.write(EHLO)
        check(await client.expect(1), (250,), "EHLO")
    return client


async def quit(client: Client) -> None:
    try:
        client.write(b"QUIT\r\n")
        await asyncio.wait_for(client.expect(1), 5)
    except Exception:
        pass
    if client.transport is not None:
        client.transport.close()


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + args.warmup + args.duration
        self.hard_stop = self.t0 + args.max_time
        self.events: list[tuple[float, int, int]] = []
        self.count = 0
        self.nbytes = 0
        self.errors: list[str] = []

    def done_one(self, size: int) -> None:
        self.count += 1
        self.nbytes += size
        self.events.append((time.monotonic(), self.count, self.nbytes))

    def should_stop(self) -> bool:
        now = time.monotonic()
        if now >= self.hard_stop:
            return True
        if now < self.stop_at:
            return False
        # For slow, big messages: keep going until the window holds two
        # completions, so there is a rate to measure.
        lo = self.t0 + self.args.warmup
        return sum(1 for e in self.events if e[0] >= lo) >= 2

    def result(self) -> dict:
        out = window_rate(self.events, self.t0, self.args.warmup, self.args.duration)
        out.update(
            t0=self.t0,
            total_messages=self.count,
            total_bytes=self.nbytes,
            errors=self.errors[:5],
            error_count=len(self.errors),
        )
        return out


async def pipelined_conn(run: Run, body: bytes) -> None:
    args = run.args
    client = await connect(args.host, args.port)
    try:
        client.write(TXN)
        check(await client.expect(3), (250, 250, 354), "MAIL/RCPT/DATA")
        data_next = body + b".\r\n" + TXN
        size = len(body)
        while not run.should_stop():
            client.write(data_next)
            check(await client.expect(4), (250, 250, 250, 354), "./MAIL/RCPT/DATA")
            run.done_one(size)
        client.write(body + b".\r\n")
        check(await client.expect(1), (250,), "end of data")
        run.done_one(size)
    finally:
        await quit(client)


async def bulk_conn(run: Run, chunks: list[bytes], size: int) -> None:
    args = run.args
    client = await connect(args.host, args.port)
    try:
        while not run.should_stop():
            client.write(TXN)
            check(await client.expect(3), (250, 250, 354), "MAIL/RCPT/DATA")
            for chunk in chunks:
                client.write(chunk)
                await client.drain()
            client.write(b".\r\n")
            codes = await asyncio.wait_for(client.expect(1), args.max_time)
            check(codes, (250,), "end of data")
            run.done_one(size)
            if args.mode == "single":
                break
    finally:
        await quit(client)


async def guarded(run: Run, coro) -> None:
    try:
        await coro
    except Exception as error:  # noqa: BLE001 - reported, not raised
        run.errors.append(f"{type(error).__name__}: {error}")


async def main_load(args: argparse.Namespace) -> dict:
    run = Run(args)
    if args.mode == "pipelined":
        body = message_body(args.size)
        tasks = [
            guarded(run, pipelined_conn(run, body)) for _ in range(args.connections)
        ]
    else:
        body = message_body(
            min(args.size, 1 << 20) if args.mode == "single" else args.size
        )
        if args.mode == "single":
            # SIZE bytes made of 1 MiB chunks of whole lines.
            chunks = [body] * max(1, args.size // len(body))
        else:
            chunks = [body]
        size = sum(len(c) for c in chunks)
        tasks = [
            guarded(run, bulk_conn(run, chunks, size)) for _ in range(args.connections)
        ]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.max_time + 10)
    except asyncio.TimeoutError:
        run.errors.append("timeout")
    result = run.result()
    result["wall_s"] = time.monotonic() - run.t0
    return result


async def main_idle(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    errors: list[str] = []

    async def one() -> Optional[Client]:
        try:
            return await asyncio.wait_for(connect(args.host, args.port), 30)
        except Exception as error:  # noqa: BLE001
            errors.append(f"{type(error).__name__}: {error}")
            return None

    # Warm-up: a few complete sessions so lazy imports and caches are loaded.
    warm = [c for c in await asyncio.gather(*(one() for _ in range(20))) if c]
    await asyncio.gather(*(quit(c) for c in warm))
    await asyncio.sleep(0.3)
    print("WARM", flush=True)
    await asyncio.wait_for(reader.readline(), args.max_time)

    clients: list[Client] = []
    t_open = time.monotonic()
    batch = 100
    for i in range(0, args.connections, batch):
        got = await asyncio.gather(
            *(one() for _ in range(min(batch, args.connections - i)))
        )
        clients.extend(c for c in got if c)
    t_open = time.monotonic() - t_open
    print(f"READY {len(clients)} {args.connections - len(clients)}", flush=True)
    try:
        await asyncio.wait_for(reader.readline(), args.max_time)
    except asyncio.TimeoutError:
        errors.append("timeout waiting for close")
    alive = sum(1 for c in clients if not c.closed.done())
    for c in clients:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0.2)
    return {
        "opened": len(clients),
        "alive_at_close": alive,
        "open_s": t_open,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["pipelined", "bulk", "single", "idle"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-c", "--connections", type=int, default=20)
    parser.add_argument("--size", type=int, default=1000, help="message bytes")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument(
        "--max-time",
        type=float,
        default=60.0,
        help="hard limit for the whole run, seconds",
    )
    args = parser.parse_args(argv)
    raise_nofile()
    if args.mode == "single":
        args.connections = 1
    result = asyncio.run(main_idle(args) if args.mode == "idle" else main_load(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
