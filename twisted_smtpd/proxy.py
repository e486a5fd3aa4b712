# -*- test-case-name: tests.test_proxy -*-
"""
PROXY protocol (HAProxy) support that fits a server-speaks-first protocol.

Twisted's C{haproxy:} wrapper starts the wrapped protocol before the PROXY
header has arrived, and tells it nothing when the header comes alone.  SMTP
greets first, so the session would see the proxy's address.  This wrapper
tells the protocol when the header is in (C{proxyHeaderReceived}), and the
protocol waits for that before it greets, so C{envelope.peer}, the logs, the
C{Received:} header and per-IP limits all see the real client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import _WrapperServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy._wrapper import (
    HAProxyProtocolWrapper,
    HAProxyWrappingFactory,
)

__all__ = ["ProxyHeaderWrapper", "proxy_endpoint", "use_proxy_header_wrapper"]


class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    """Calls C{wrappedProtocol.proxyHeaderReceived()} once the header is parsed."""

    awaiting_proxy_header = True

    def dataReceived(self, data: bytes) -> None:
        if not self.awaiting_proxy_header:
            self.wrappedProtocol.dataReceived(data)
            return
        # Bytes after the header reach the protocol inside this call; a header
        # that came alone is only visible as _proxyInfo afterwards.
        super().dataReceived(data)
        if self._proxyInfo is not None:
            self.awaiting_proxy_header = False
            notify = getattr(self.wrappedProtocol, "proxyHeaderReceived", None)
            if notify is not None:
                notify()


class ProxyHeaderWrappingFactory(HAProxyWrappingFactory):
    protocol = ProxyHeaderWrapper  # type: ignore[assignment]


def proxy_endpoint(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """Wrap C{endpoint} so connections start with a PROXY v1/v2 header."""
    return _WrapperServerEndpoint(endpoint, ProxyHeaderWrappingFactory)


def use_proxy_header_wrapper(endpoint: Any) -> Any:
    """An endpoint from C{serverFromString("haproxy:...")}, with our wrapper."""
    if (
        isinstance(endpoint, _WrapperServerEndpoint)
        and endpoint._wrapperFactory is HAProxyWrappingFactory
    ):
        return _WrapperServerEndpoint(
            endpoint._wrappedEndpoint, ProxyHeaderWrappingFactory
        )
    return endpoint
