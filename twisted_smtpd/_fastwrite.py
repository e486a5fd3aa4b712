# -*- test-case-name: tests.test_fastwrite -*-
"""
Send a reply straight to the socket when the transport has nothing queued.

C{transport.write} on a TCP connection only queues the bytes and asks the
reactor to watch for writability: every reply then costs an C{epoll_ctl} to
add the watch, one more turn of the reactor loop, the C{send}, and an
C{epoll_ctl} to remove the watch.  SMTP is lock-step, so almost every reply
meets an empty send buffer and could go out at once; that is what
L{direct_writer} does.  It falls back to C{transport.write} for whatever the
kernel does not take, and whenever anything is already queued, so the byte
order and Twisted's own buffering and producer logic are unchanged.

Only a plain (non-TLS) L{twisted.internet.tcp.Connection} qualifies, and only
if it has the attributes this relies on; anything else (TLS, wrappers, test
transports, another Twisted) gets C{None} and the caller uses
C{transport.write}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import tcp

__all__ = ["direct_writer"]

# What FileDescriptor.write/doWrite keep their queue and state in.
_REQUIRED = ("dataBuffer", "_tempDataLen", "_writeDisconnected", "writeSomeData")


def direct_writer(transport: Any) -> Optional[Callable[[bytes], None]]:
    """A C{write(data)} for C{transport} that tries the socket first, or C{None}."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return None
    if not all(hasattr(transport, name) for name in _REQUIRED):
        return None
    queue_write = transport.write
    send = transport.writeSomeData

    def write(data: bytes) -> None:
        t = transport
        if (
            t.connected
            and not t.disconnecting
            and not t.TLS
            and not t.dataBuffer
            and not t._tempDataLen
            and not t._writeDisconnected
        ):
            sent = send(data)
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
            # 0 (would block) or a lost connection: queue it; the reactor
            # sends it or reports the loss as usual.
        queue_write(data)

    return write
