"""The sandbox's gunicorn worker: gevent's, with each request stamped by the kernel when its bytes arrived.

The sandbox counts what an upstream's quota would judge: when each request reached it.  Stamped
in its own request handler, that time is when a gevent loop sharing the CPU got round to the
request; under load, requests that arrived evenly wait in the socket buffers and are handled (and
stamped) in a bunch (docs/benchmarks.md, rate-limit fidelity: 39 in a second counted against an
even 20 sent).  So this worker asks the kernel to stamp every incoming segment (`SO_TIMESTAMPNS`,
set on the listening sockets and inherited by each accepted one) and reads requests with
`recvmsg`, keeping the stamp of the bytes each read returned.  On loopback the stamp is taken
inside the sender's own `send` call, so it holds however late the sandbox reads the request.

    gunicorn -k devstack.sandbox_worker.StampingGeventWorker -w 1 'devstack.sandbox:create_app()'

The request's stamp is `environ["gunicorn.socket"].arrived_at` (epoch seconds, or None when the
kernel gave none); `devstack.sandbox` falls back to its handler's clock without it.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from gunicorn.workers.ggevent import GeventWorker

# <asm-generic/socket.h>: SO_TIMESTAMPNS (SO_TIMESTAMPNS_OLD, a struct timespec of two 64-bit
# fields on 64-bit Linux); Python 3.11's socket module does not name it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


def enable_stamps(sock) -> bool:
    """Ask the kernel to stamp what arrives on `sock` (and on sockets it accepts); False if refused."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def stamp_of(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The receive time in `recvmsg`'s ancillary data (epoch seconds), if the kernel sent one."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack(data[: _TIMESPEC.size])
            return seconds + nanoseconds / 1e9
    return None


class StampedSocket:
    """A connection whose reads keep the kernel's receive stamp of the last bytes they returned.

    For TCP the stamp is that of the newest segment a read consumed.  An HTTP/1.1 client sends its
    next request only after the answer to the last one, so one read holds one request's bytes: the
    stamp is when that request arrived.  Everything but `recv` is the wrapped socket's.
    """

    __slots__ = ("_sock", "arrived_at")

    def __init__(self, sock) -> None:
        self._sock = sock
        self.arrived_at: float | None = None

    def recv(self, size: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self._sock.recvmsg(size, _ANCILLARY, flags)
        if data:
            self.arrived_at = stamp_of(ancillary)
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class StampingGeventWorker(GeventWorker):
    """gunicorn's gevent worker, reading each connection through a `StampedSocket`."""

    def run(self) -> None:
        # On the listeners before any connection: accepted sockets inherit the option, so even a
        # request that arrived before its connection was accepted is stamped on arrival.
        for listener in self.sockets:
            enable_stamps(listener)
        super().run()

    def handle(self, listener, client, addr) -> None:
        with contextlib.suppress(OSError):
            if not client.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS):
                enable_stamps(client)
        super().handle(listener, StampedSocket(client), addr)
