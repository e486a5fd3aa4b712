# -*- test-case-name: tests.test_workers -*-
"""
C{--workers N}: serve one set of listening sockets from N processes.

The twistd process binds the ports as usual and serves too; it then starts
N-1 worker processes that inherit the listening sockets and adopt them
(C{IReactorSocket.adoptStreamPort}).  Every process takes one new connection
per turn of its reactor, so the least busy one takes the next.  On stop the
parent asks every worker to shut down gracefully (SIGTERM), waits for them,
and only then stops itself.  A worker whose parent disappears shuts itself
down.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

__all__ = ["WorkerPool", "SHAREABLE_ENDPOINTS"]

_log = Logger()

#: endpoint types whose listening socket a worker can adopt
SHAREABLE_ENDPOINTS = (
    endpoints.TCP4ServerEndpoint,
    endpoints.TCP6ServerEndpoint,
    endpoints.SSL4ServerEndpoint,
)


class _Worker(ProcessProtocol):
    def __init__(self, number: int) -> None:
        self.number = number
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        _log.info(
            "smtpd worker {number} ended: {reason}",
            number=self.number,
            reason=reason.value,
        )
        self.ended.callback(None)


class WorkerPool(service.Service):
    """Starts and stops the worker processes of a twistd smtpd.

    Args:
        listeners: the parent's L{StreamServerEndpointService}s, in C{--port}
            order; their ports are handed to the workers.
        count: worker processes besides the parent.
        argv: the C{smtpd} options, for the workers to build the same policy.
        grace: seconds the workers get to drain on stop.
    """

    def __init__(
        self, listeners: list[Any], count: int, argv: list[str], grace: float
    ) -> None:
        self.listeners = listeners
        self.count = count
        self.argv = argv
        self.grace = grace
        self.workers: list[tuple[Any, _Worker]] = []

    def startService(self) -> None:
        super().startService()
        waiting = [listener._waitingForPort for listener in self.listeners]
        gatherResults(waiting).addCallback(self._spawn).addErrback(
            lambda failure: _log.failure("smtpd: could not start workers", failure)
        )

    def _spawn(self, ports: list[Any]) -> None:
        from twisted.internet import reactor

        for port in ports:
            accept_one_at_a_time(port)
        fds = [port.fileno() for port in ports]
        families = [port.addressFamily for port in ports]
        shared = ",".join(f"{fd}:{int(family)}" for fd, family in zip(fds, families))
        for number in range(1, self.count + 1):
            worker = _Worker(number)
            child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
            child_fds.update({fd: fd for fd in fds})
            process = reactor.spawnProcess(
                worker,
                sys.executable,
                [
                    sys.executable,
                    "-m",
                    "twisted_smtpd.workers",
                    shared,
                    str(os.getpid()),
                    str(number),
                    *self.argv,
                ],
                env=dict(os.environ),
                childFDs=child_fds,
            )
            self.workers.append((process, worker))
        _log.info("smtpd: started {count} worker processes", count=self.count)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        from twisted.internet import reactor

        waits = []
        for process, worker in self.workers:
            if not worker.ended.called:
                try:
                    process.signalProcess("TERM")
                except Exception:
                    pass
                waits.append(worker.ended)
        if not waits:
            return succeed(None)

        def kill_stragglers() -> None:
            for process, worker in self.workers:
                if not worker.ended.called:
                    try:
                        process.signalProcess("KILL")
                    except Exception:
                        pass

        killer = reactor.callLater(self.grace + 5, kill_stragglers)
        done = DeferredList(waits)
        done.addBoth(lambda _: killer.cancel() if killer.active() else None)
        return done


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


def _worker_main(args: list[str]) -> None:
    """Entry point of a worker: adopt the sockets, serve, drain on SIGTERM."""
    shared, parent_pid, number, smtpd_argv = args[0], int(args[1]), args[2], args[3:]
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .tap import Options, TLSReloadService, build_factory

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    options = Options()
    options.parseOptions(smtpd_argv)
    factory = build_factory(options)
    ports = []
    for (fd_text, family_text), endpoint in zip(
        (item.split(":") for item in shared.split(",")), options["endpoints"]
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
            stopping.append(factory.shutdown(options["grace"]))
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
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(drain))  # type: ignore[attr-defined]
        if options.get("tls_contexts"):
            # The parent relays SIGHUP: reload certificates here too.
            TLSReloadService(options["tls_contexts"]).startService()

    reactor.addSystemEventTrigger("before", "shutdown", drain)
    reactor.callWhenRunning(install_signals)
    LoopingCall(orphaned).start(1.0, now=False)
    _log.info("smtpd worker {number} serving", number=number)
    reactor.run()


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
