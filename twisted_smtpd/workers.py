# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: serve one set of listening sockets from N processes.

The twistd process binds the ports as usual and serves too; it then starts
N-1 worker processes that inherit the listening sockets and adopt them
(C{IReactorSocket.adoptStreamPort}).  Every process takes one new connection
per turn of its reactor, so the least busy one takes the next.  On stop the
parent asks every worker to shut down gracefully (SIGTERM), waits for them,
and only then stops itself.  A worker whose parent disappears shuts itself
down; a worker that dies while the parent runs is started again, after a
delay that doubles while it keeps dying young.

Workers log as JSON records to a pipe; the parent publishes each event to
its own observers, so worker lines go wherever twistd was told to log
(C{--logfile}, C{--syslog}, C{--logger}), tagged C{[worker N]}.

This module imports nothing else of twisted_smtpd: L{tap} gives the pool the
command that starts a worker (L{twisted_smtpd.tap.run_worker}), which builds
the factory and calls L{serve_worker}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

__all__ = ["WorkerPool", "SHAREABLE_ENDPOINTS", "serve_worker"]

_log = Logger()

#: endpoint types whose listening socket a worker can adopt
SHAREABLE_ENDPOINTS = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
)

#: a worker's log line longer than this is passed on in pieces
_MAX_LOG_LINE = 1024 * 1024


class _Worker(ProcessProtocol):
    """One worker process: relays its log, tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.system = f"worker {number}"
        self.started_at = pool.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > _MAX_LOG_LINE:
            lines.append(rest)
        elif rest:
            self._partial[childFD] = rest
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        if childFD == 1 and line.startswith(b"\x1e"):
            try:
                record = json.loads(line[1:])
                event = {
                    "log_format": "{text}",
                    "text": record["text"],
                    "log_level": LogLevel.levelWithName(record["level"]),
                    "log_namespace": record["namespace"],
                    "log_time": record["time"],
                }
            except (ValueError, KeyError, TypeError, AttributeError):
                event = None  # not one of our records: pass it on as text
            if event is not None:
                system = record.get("system")
                event["log_system"] = (
                    self.system if system in (None, "-") else f"{self.system} {system}"
                )
                globalLogPublisher(event)
                return
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:  # print() or a crash before logging began
            level = LogLevel.error if childFD == 2 else LogLevel.info
            _log.emit(level, "{text}", text=text, log_system=self.system)

    def processEnded(self, reason: Any) -> None:
        for childFD, rest in sorted(self._partial.items()):
            self._relay(childFD, rest)
        self._partial.clear()
        self.ended.callback(None)
        self.pool._worker_ended(self, reason)


class WorkerPool(service.Service):
    """Starts, restarts and stops the worker processes of a twistd smtpd.

    Args:
        listeners: the parent's L{StreamServerEndpointService}s, in C{--port}
            order; their ports are handed to the workers.
        count: worker processes besides the parent.
        argv: the C{smtpd} options, for the workers to build the same policy.
        grace: seconds the workers get to drain on stop.
        command: the interpreter arguments that start a worker; the shared
            sockets, the parent's pid, the worker's number and C{argv}
            follow.
        reactor: default the global reactor.

    C{restarts} counts the workers started again after dying.
    """

    #: the first restart waits this long; each quick death doubles it
    restart_delay = 0.5
    #: the longest wait before a restart
    max_restart_delay = 60.0
    #: a worker that ran this long died of something new: the delay resets
    stable_after = 30.0

    def __init__(
        self,
        listeners: list[Any],
        count: int,
        argv: list[str],
        grace: float,
        command: Sequence[str] = (),
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.listeners = listeners
        self.count = count
        self.argv = argv
        self.grace = grace
        self.command = list(command)
        self.reactor = reactor
        self.restarts = 0
        #: worker number -> (process transport, protocol) of the live one
        self._live: dict[int, tuple[Any, _Worker]] = {}
        self._shared = ""
        self._ports: list[Any] = []
        self._fds: list[int] = []
        self._quick_deaths: dict[int, int] = {}
        self._pending_restarts: dict[int, Any] = {}

    @property
    def workers(self) -> list[tuple[Any, _Worker]]:
        """(process transport, protocol) of each live worker, by number."""
        return [self._live[number] for number in sorted(self._live)]

    def startService(self) -> None:
        super().startService()
        waiting = [listener._waitingForPort for listener in self.listeners]
        gatherResults(waiting).addCallback(self._spawn_all).addErrback(
            lambda failure: _log.failure("smtpd: could not start workers", failure)
        )

    def _spawn_all(self, ports: list[Any]) -> None:
        for port in ports:
            accept_one_at_a_time(port)
        self._ports = list(ports)
        self._fds = [port.fileno() for port in ports]
        families = [port.addressFamily for port in ports]
        self._shared = ",".join(
            f"{fd}:{int(family)}" for fd, family in zip(self._fds, families)
        )
        for number in range(1, self.count + 1):
            self._spawn(number)
        _log.info("smtpd: started {count} worker processes", count=self.count)

    def _spawn(self, number: int) -> None:
        self._pending_restarts.pop(number, None)
        if not self.running:
            return
        if not all(getattr(port, "connected", True) for port in self._ports):
            # Draining: our listening sockets are closed, nothing to adopt.
            _log.info(
                "smtpd worker {number} not started again: the ports are closed",
                number=number,
            )
            return
        worker = _Worker(self, number)
        # Their stdout and stderr come to us: see _Worker._relay.
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({fd: fd for fd in self._fds})
        process = self.reactor.spawnProcess(
            worker,
            sys.executable,
            [
                sys.executable,
                *self.command,
                self._shared,
                str(os.getpid()),
                str(number),
                *self.argv,
            ],
            env=dict(os.environ),
            childFDs=child_fds,
        )
        self._live[number] = (process, worker)

    def _worker_ended(self, worker: _Worker, reason: Any) -> None:
        if self._live.get(worker.number, (None, worker))[1] is worker:
            del self._live[worker.number]
        how = _how_it_ended(reason)
        if not self.running:
            _log.info(
                "smtpd worker {number} ended: {how}", number=worker.number, how=how
            )
            return
        lived = self.reactor.seconds() - worker.started_at
        if lived >= self.stable_after:
            self._quick_deaths[worker.number] = 0
        deaths = self._quick_deaths.get(worker.number, 0)
        self._quick_deaths[worker.number] = deaths + 1
        delay = min(self.restart_delay * 2**deaths, self.max_restart_delay)
        self.restarts += 1
        _log.warn(
            "smtpd worker {number} ended: {how}; starting it again in"
            " {delay:.1f} s (restart {restarts})",
            number=worker.number,
            how=how,
            delay=delay,
            restarts=self.restarts,
        )
        self._pending_restarts[worker.number] = self.reactor.callLater(
            delay, self._spawn, worker.number
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._pending_restarts.values():
            if call.active():
                call.cancel()
        self._pending_restarts.clear()
        waits = []
        for process, worker in self.workers:
            try:
                process.signalProcess("TERM")
            except Exception:
                pass  # it has just ended
            waits.append(worker.ended)
        if not waits:
            return succeed(None)

        def kill_stragglers() -> None:
            for process, _ in self.workers:
                try:
                    process.signalProcess("KILL")
                except Exception:
                    pass

        killer = self.reactor.callLater(self.grace + 5, kill_stragglers)
        done = DeferredList(waits)
        done.addBoth(lambda _: killer.cancel() if killer.active() else None)
        return done


@implementer(ILogObserver)
class _RecordObserver:
    """A worker's log events as one-line records for the parent to relay.

    The text is formatted here (with the traceback of a failure), so the
    record is small: Twisted's JSON of the whole event cost about three
    times as much per line.  C{RS JSON LF}, like C{jsonFileLogObserver}.
    """

    def __init__(self, out: Any) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
        level = event.get("log_level") or LogLevel.info
        record = {
            "text": text,
            "level": level.name,
            "namespace": event.get("log_namespace", "-"),
            "time": event.get("log_time"),
            "system": event.get("log_system"),
        }
        self._out.write("\x1e" + json.dumps(record) + "\n")
        self._out.flush()


def _how_it_ended(reason: Any) -> str:
    """C{killed by SIGKILL}, C{exit code 1} or C{exit code 0}."""
    number = getattr(reason.value, "signal", None)
    if number:
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exit code {getattr(reason.value, 'exitCode', None)}"


def accept_one_at_a_time(port: Any) -> None:
    """Make C{port} accept one connection per wake-up instead of a burst.

    Every process sharing a listening socket is woken for a new connection;
    Twisted's port then accepts up to ~100 in a row, so after a burst one
    process holds most of the sessions.  Taking one per turn of the reactor
    lets the least busy process take the next, which spreads long sessions.
    """
    read = port.doRead

    def do_read() -> Any:
        port.numberAccepts = 1
        return read()

    port.doRead = do_read


def serve_worker(
    factory: Any,
    server_endpoints: Sequence[Any],
    args: Sequence[str],
    grace: float,
) -> None:
    """Run one worker: adopt the sockets, serve, drain on SIGTERM.

    Args:
        factory: the worker's own factory, built from the same options.
        server_endpoints: the parsed C{--port} endpoints, in order.
        args: the shared sockets, the parent's pid and the worker's number,
            as L{WorkerPool} passes them.
        grace: seconds sessions get to finish on stop.
    """
    shared, parent_pid, number = args[0], int(args[1]), args[2]
    from twisted.internet import reactor

    # The parent relays these records to where twistd logs (see _Worker).
    globalLogBeginner.beginLoggingTo(
        [_RecordObserver(sys.stdout)], redirectStandardIO=False
    )
    ports = []
    for (fd_text, family_text), endpoint in zip(
        (item.split(":") for item in shared.split(",")), server_endpoints
    ):
        fd, family = int(fd_text), socket.AddressFamily(int(family_text))
        wrapped: Any = factory
        if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
            wrapped = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
        port = reactor.adoptStreamPort(fd, family, wrapped)  # type: ignore[attr-defined]
        accept_one_at_a_time(port)
        ports.append(port)
        os.close(fd)  # adoptStreamPort duplicated it

    stopping: list[Deferred[Any]] = []

    def drain() -> Deferred[Any]:
        if not stopping:
            for port in ports:
                port.stopListening()
            stopping.append(factory.shutdown(grace))
        return stopping[0]

    stop_requested = [False]

    def stop_once() -> None:
        # SIGTERM may come from the parent and from a process-group kill.
        if not stop_requested[0]:
            stop_requested[0] = True
            reactor.stop()

    def orphaned() -> None:
        if os.getppid() != parent_pid:
            _log.info("smtpd worker {number}: parent gone, stopping", number=number)
            stop_once()

    def install_signals() -> None:
        # Ctrl-C reaches the whole process group; the parent relays a SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(
            signal.SIGTERM,
            lambda *_: reactor.callFromThread(stop_once),  # type: ignore[attr-defined]
        )
        # A drain (the parent relays its SIGUSR1): stop accepting, keep running.
        signal.signal(
            signal.SIGUSR1,
            lambda *_: reactor.callFromThread(drain),  # type: ignore[attr-defined]
        )
        # Only now: the reactor runs and SIGTERM/SIGUSR1 are ours (before,
        # a SIGUSR1 relayed on seeing this line would kill the worker).
        _log.info("smtpd worker {number} serving", number=number)

    reactor.addSystemEventTrigger("before", "shutdown", drain)
    reactor.callWhenRunning(install_signals)
    LoopingCall(orphaned).start(1.0, now=False)
    reactor.run()
