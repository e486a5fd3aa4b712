# -*- test-case-name: tests.test_fastwrite -*-
"""
Send a reply straight to the socket when the transport has nothing queued.

C{transport.write} on a TCP connection only queues the bytes and asks the
reactor to watch for writability: every reply then costs an C{epoll_ctl} to
add the watch, one more turn of the reactor loop, the C{send}, and an
C{epoll_ctl} to remove the watch.  SMTP is lock-step, so almost every reply
meets an empty send buffer and could go out at once; that is what
L{write_directly} does.  It falls back to C{transport.write} for whatever the
kernel does not take, and whenever anything is already queued, so the byte
order and Twisted's own buffering and producer logic are unchanged.

Only a plain (non-TLS) L{twisted.internet.tcp.Connection} qualifies, and only
if it has the attributes this relies on; anything else (TLS, wrappers, test
transports, another Twisted) fails L{can_write_directly} and the caller uses
C{transport.write}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["can_write_directly", "write_directly"]

# What FileDescriptor.write/doWrite keep their queue and state in.
_REQUIRED = ("dataBuffer", "_tempDataLen", "_writeDisconnected", "writeSomeData")


def can_write_directly(transport: Any) -> bool:
    """Whether L{write_directly} may be used for C{transport}."""
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", True)
        and all(hasattr(transport, name) for name in _REQUIRED)
    )


def write_directly(transport: Any, data: bytes) -> None:
    """C{transport.write(data)}, trying the socket first when nothing is queued.

    Only for a transport L{can_write_directly} accepted.  A module function,
    not a closure per connection: an idle session must stay small.
    """
    t = transport
    if (
        t.connected
        and not t.disconnecting
        and not t.TLS
        and not t.dataBuffer
        and not t._tempDataLen
        and not t._writeDisconnected
    ):
        sent = t.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
        # 0 (would block) or a lost connection: queue it; the reactor sends
        # it or reports the loss as usual.
    t.write(data)
