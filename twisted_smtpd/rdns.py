# -*- test-case-name: tests.test_rdns -*-
"""
The client's name, from reverse DNS confirmed by forward DNS (as Postfix does).

A PTR answer alone proves nothing: whoever controls the client's address block
writes it.  The name counts only if it resolves (A or AAAA) back to the
client's address; otherwise the client is C{unknown}.  Lookups go through
C{twisted.names}, so they never block the reactor; results are cached for the
records' TTL (bounded), concurrent lookups of one address share one query, and
every lookup ends within C{timeout} seconds with a name or C{unknown}.

The protocol starts the lookup at connect and waits for it only when a
message begins (the C{Received:} header needs it), never before the greeting.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from typing import Any, Optional

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError

from ._xclient import UNKNOWN, normalize_address, valid_hostname

__all__ = ["ReverseDNS", "ClientName", "name_client", "UNKNOWN"]

_log = Logger(namespace="twisted_smtpd.rdns")


class ReverseDNS:
    """Forward-confirmed reverse DNS with a bounded cache.

    Args:
        resolver: a C{twisted.names} resolver (L{IResolver}); default one
            made from C{/etc/resolv.conf} on first use.
        reactor: for timeouts; default the global reactor.
        timeout: seconds a lookup may take in all (PTR and forward), then
            the client is C{unknown} (not cached: the next one asks again).
        max_ttl: the longest a result is kept, whatever the TTL says.
        negative_ttl: how long "no name" (NXDOMAIN, not confirmed) is kept.
        max_entries: cache size; the oldest entries go first.
        max_names: PTR names tried at most, for an address with many.
    """

    def __init__(
        self,
        resolver: Any = None,
        *,
        reactor: Optional[IReactorTime] = None,
        timeout: float = 5.0,
        max_ttl: float = 3600.0,
        negative_ttl: float = 300.0,
        max_entries: int = 10_000,
        max_names: int = 3,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor: Any = reactor
        self._resolver = resolver
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_names = max_names
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._waiting: dict[str, list[Deferred[str]]] = {}

    @property
    def resolver(self) -> Any:
        if self._resolver is None:
            from twisted.names.client import createResolver

            self._resolver = createResolver()
        return self._resolver

    def cached(self, host: str) -> Optional[str]:
        """The name of C{host} if known now, else None."""
        entry = self._cache.get(host)
        if entry is None:
            return None
        if entry[1] <= self._reactor.seconds():
            del self._cache[host]
            return None
        return entry[0]

    def lookup(self, host: str) -> Deferred[str]:
        """The confirmed name of the address C{host}, or C{unknown}; never fails."""
        try:
            host = normalize_address(host)
        except ValueError:
            return succeed(UNKNOWN)
        name = self.cached(host)
        if name is not None:
            return succeed(name)
        result: Deferred[str] = Deferred()
        waiting = self._waiting.get(host)
        if waiting is not None:
            waiting.append(result)
            return result
        self._waiting[host] = [result]
        query = self._resolve(host)
        deadline = self._reactor.callLater(self.timeout, self._expired, host, query)
        query.addBoth(self._resolved, host, deadline)
        return result

    def _expired(self, host: str, query: Deferred[Any]) -> None:
        _log.info(
            "smtpd rdns: no answer for {host} within {timeout}s",
            host=host,
            timeout=self.timeout,
        )
        self._answer(host, UNKNOWN)
        query.cancel()

    def _resolved(self, outcome: Any, host: str, deadline: Any) -> None:
        if deadline.active():
            deadline.cancel()
        if isinstance(outcome, tuple):
            name, ttl = outcome
            self._store(host, name, ttl)
            self._answer(host, name)
            return
        # A failure: a server error or timeout is temporary, not cached.
        if self._waiting.get(host) is not None:
            _log.info(
                "smtpd rdns: lookup of {host} failed: {error}",
                host=host,
                error=outcome.getErrorMessage(),
            )
        self._answer(host, UNKNOWN)

    def _answer(self, host: str, name: str) -> None:
        for waiter in self._waiting.pop(host, ()):
            waiter.callback(name)

    def _store(self, host: str, name: str, ttl: float) -> None:
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0:
            return
        cache = self._cache
        cache[host] = (name, self._reactor.seconds() + ttl)
        cache.move_to_end(host)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)

    @inlineCallbacks
    def _resolve(self, host: str) -> Any:
        """(name, ttl): the confirmed name, or C{unknown} with the negative TTL."""
        address = ipaddress.ip_address(host)
        timeout = (self.timeout,)
        try:
            answers, _, _ = yield self.resolver.lookupPointer(
                address.reverse_pointer, timeout
            )
        except DNSNameError:
            return UNKNOWN, self.negative_ttl
        names: dict[str, int] = {}  # name -> PTR TTL, in answer order
        for record in answers:
            if record.type == dns.PTR:
                name = str(record.payload.name).rstrip(".").lower()
                if valid_hostname(name) and name not in names:
                    names[name] = record.ttl
        for name, ptr_ttl in list(names.items())[: self.max_names]:
            if address.version == 4:
                lookup, wanted = self.resolver.lookupAddress, dns.A
            else:
                lookup, wanted = self.resolver.lookupIPV6Address, dns.AAAA
            try:
                forward, _, _ = yield lookup(name, timeout)
            except DNSNameError:
                continue
            for record in forward:
                if record.type == wanted and _record_address(record.payload) == host:
                    return name, min(ptr_ttl, record.ttl)
        return UNKNOWN, self.negative_ttl


class ClientName:
    """One session's client name: looked up at connect, awaited at a message.

    It sets C{session.peer_name} (and the envelope's, if MAIL came first)
    when the lookup ends.  XCLIENT may name another client meanwhile:
    L{forget} drops the answer that is still coming.

    Args:
        rdns: the factory's L{ReverseDNS}.
        session: the session to name (a L{Session}).
    """

    __slots__ = ("_rdns", "_session", "_lookup", "_wait")

    def __init__(self, rdns: ReverseDNS, session: Any) -> None:
        self._rdns = rdns
        self._session = session
        self._lookup: Optional[Deferred[str]] = None
        self._wait: Optional[Deferred[None]] = None

    def look_up(self, host: str) -> None:
        """Start naming C{host}; the earlier lookup's answer no longer counts."""
        lookup = self._lookup = self._rdns.lookup(host)
        lookup.addCallback(self._named, lookup)

    def forget(self) -> None:
        """The name is known another way (XCLIENT): ignore the lookup."""
        self._lookup = None

    def hold(self, protocol: Any, method: Any, argument: str) -> bool:
        """If the name is still coming: hold C{protocol}'s input, and run
        C{method(protocol, argument)} again once the name is known.

        The C{Received:} header of the message needs it; the lookup ends
        within its own timeout.  False if the name is known now.
        """
        if self._lookup is None:
            return False
        wait: Deferred[None] = Deferred()
        self._wait = wait
        protocol._hold(wait)
        wait.addCallback(protocol._complete, protocol._run_again, method, argument)
        wait.addErrback(protocol._unexpected)
        return True

    def _named(self, name: str, lookup: Deferred[str]) -> None:
        if self._lookup is not lookup:
            return  # XCLIENT named another client meanwhile
        self._lookup = None
        session = self._session
        session.peer_name = name
        if session.envelope is not None:  # made at MAIL, before the answer
            session.envelope.peer_name = name
        wait, self._wait = self._wait, None
        if wait is not None:
            wait.callback(None)


def name_client(
    rdns: Any, session: Any, host: str, previous: Optional[ClientName]
) -> Optional[ClientName]:
    """Name the session's client at C{host}: at once if the cache knows it
    (most clients: no Deferred, no lookup), else by a lookup.

    Returns:
        What to wait on for the name, or None if it is known now.
        C{previous} (XCLIENT naming another client) no longer counts.
    """
    cached = getattr(rdns, "cached", None)  # a stand-in may have only lookup
    name = None if cached is None else cached(host)
    if name is not None:
        if previous is not None:
            previous.forget()  # its answer, still to come, no longer counts
        session.peer_name = name
        if session.envelope is not None:
            session.envelope.peer_name = name
        return None
    client = previous if previous is not None else ClientName(rdns, session)
    client.look_up(host)
    return client


def _record_address(payload: Any) -> str:
    if isinstance(payload, dns.Record_A):
        return str(payload.dottedQuad())
    return normalize_address(socket.inet_ntop(socket.AF_INET6, payload.address))
