"""The optional ``GET /metrics`` listener: non-blocking sockets that the daemon's own poll() drives.

Not a thread serving a snapshot: the daemon forks hooks with a ``preexec_fn`` that is safe
only while it is single-threaded (uoomd/hooks.py), and its pages are mlocked (a thread's
stack would be too). Not a blocking call anywhere: the listening socket and each
connection are non-blocking, their fds join the loop's poll set (:meth:`MetricsListener.poll_fds`)
and each wake-up does what the socket allows and returns (:meth:`MetricsListener.handle`).
A client that connects and sends nothing costs one fd until its deadline; a client that
does not read its answer, the same; the oldest is dropped past MAX_CONNECTIONS.

HTTP/1.0 with ``Connection: close``: one request per connection, which is what a scraper
sends; the answer is the exposition as it is at that moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from uoomd.metrics.exposition import CONTENT_TYPE

MAX_CONNECTIONS = 16
CONNECTION_DEADLINE_S = 5.0  # a scraper sends its request at once; it times out itself after 10 s by default
REQUEST_LIMIT_BYTES = 8192  # a GET with Prometheus' headers is ~300 bytes
ACCEPTS_PER_WAKEUP = 16  # a connect flood cannot keep one wake-up busy
EMFILE_PAUSE_S = 1.0  # out of fds: stop accepting for a while, rather than spin on a readable socket
# A unix socket is mode 0666: connecting needs write permission, and what it serves is what
# the 0644 textfile shows every local user (numbers and guard names, no process names).
UNIX_SOCKET_MODE = 0o666
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) less the NUL


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """Where to listen: an IP address and port (no host name: the daemon resolves nothing), or a unix socket path."""

    family: socket.AddressFamily
    host: str = ""
    port: int = 0
    path: str = ""

    def describe(self) -> str:
        if self.family is socket.AF_UNIX:
            return self.path
        return f"[{self.host}]:{self.port}" if self.family is socket.AF_INET6 else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``metrics_listen`` as written in the policy: ``127.0.0.1:9595``, ``[::1]:9595`` or
    ``/run/uoomd/metrics.sock``. Raises ValueError with what is wrong."""
    if text.startswith("/"):
        if "\0" in text:
            raise ValueError("a unix socket path cannot hold a NUL character")
        if len(os.fsencode(text)) > _SUN_PATH_MAX:
            raise ValueError(f"a unix socket path is at most {_SUN_PATH_MAX} bytes")
        return ListenAddress(family=socket.AF_UNIX, path=os.path.normpath(text))
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT (an IP address) or an absolute unix socket path")
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port is a number from 1 to 65535")
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address (a host name would need DNS)") from None
    return ListenAddress(family=family, host=host, port=int(port_text))


# --- HTTP (pure) ---------------------------------------------------------------------------


def _response(
    status: str, body: bytes, *, content_type: str = "text/plain; charset=utf-8", head: bool = False
) -> bytes:
    headers = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\nCache-Control: no-store\r\n"
    )
    if status.startswith("405"):
        headers += "Allow: GET, HEAD\r\n"
    return (headers + "\r\n").encode("ascii") + (b"" if head else body)


def respond(request: bytes, render: Callable[[], bytes]) -> bytes:
    """The whole answer to one request head (pure but for ``render``): 200 for GET or HEAD of
    /metrics, 404 elsewhere, 405 for another method, 400 for what is not HTTP."""
    line = request.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"only GET and HEAD\n")
    if target != b"/metrics":
        return _response("404 Not Found", b"uoomd serves /metrics\n")
    return _response("200 OK", render(), content_type=CONTENT_TYPE, head=method == b"HEAD")


def request_complete(buffer: bytes | bytearray) -> bool:
    """The head of a request ends at an empty line (a bare LF accepted, as servers do)."""
    return b"\r\n\r\n" in buffer or b"\n\n" in buffer


# --- sockets ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Connection:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    pending: memoryview | None = None  # the answer's unsent rest, once there is an answer


class MetricsListener:
    """Serves ``render()`` at ``GET /metrics``; the daemon polls :meth:`poll_fds` and calls :meth:`handle`."""

    def __init__(
        self, sock: socket.socket, address: ListenAddress, render: Callable[[], bytes], *, inode: tuple[int, int] | None
    ) -> None:
        self._sock = sock
        self.address = address
        self._render = render
        self._inode = inode  # a unix socket's (st_dev, st_ino): close() unlinks only our own
        self._connections: dict[int, _Connection] = {}
        self._paused_until = float("-inf")

    @classmethod
    def open(cls, address: ListenAddress, render: Callable[[], bytes]) -> MetricsListener:
        """Bind and listen; raises OSError (address in use, no permission) or ValueError (a path
        that is not a socket: never removed)."""
        sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            inode = None
            if address.family is socket.AF_UNIX:
                inode = _bind_unix(sock, address.path)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address.host, address.port))
            sock.listen(MAX_CONNECTIONS)
        except BaseException:
            sock.close()
            raise
        return cls(sock, address, render, inode=inode)

    def bound_port(self) -> int:
        """The TCP port bound (tests bind port 0)."""
        port: int = self._sock.getsockname()[1]
        return port

    def poll_fds(self, now: float) -> dict[int, int]:
        """fd -> poll mask, for the loop's poll set: the listening socket unless paused, each
        connection for reading its request or for writing its answer."""
        fds = {} if now < self._paused_until else {self._sock.fileno(): select.POLLIN}
        for fd, conn in self._connections.items():
            fds[fd] = select.POLLOUT if conn.pending is not None else select.POLLIN
        return fds

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def owns(self, fd: int) -> bool:
        return fd == self._sock.fileno() or fd in self._connections

    def handle(self, fd: int, revents: int, now: float) -> None:
        """Do what one poll event allows, without waiting, and return."""
        if fd == self._sock.fileno():
            self._accept(now)
            return
        conn = self._connections.get(fd)
        if conn is None:
            return
        if revents & (select.POLLERR | select.POLLNVAL):
            self._close(fd)
        elif conn.pending is not None:
            self._send(fd, conn)
        elif revents & (select.POLLIN | select.POLLHUP):
            self._receive(fd, conn)

    def expire(self, now: float) -> None:
        """Close the connections past their deadline (at each tick: the loop wakes at least every poll_max)."""
        for fd in [fd for fd, conn in self._connections.items() if now >= conn.deadline]:
            self._close(fd)

    def close(self) -> None:
        for fd in list(self._connections):
            self._close(fd)
        self._sock.close()
        if self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.address.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.address.path)

    # -- one event each

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._paused_until = now + EMFILE_PAUSE_S
                    return
                continue  # ECONNABORTED and the like: that client is gone, take the next
            sock.setblocking(False)
            if len(self._connections) >= MAX_CONNECTIONS:
                self._close(next(iter(self._connections)))  # the oldest: a scraper sends at once
            self._connections[sock.fileno()] = _Connection(sock=sock, deadline=now + CONNECTION_DEADLINE_S)

    def _receive(self, fd: int, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(REQUEST_LIMIT_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        if not chunk:
            self._close(fd)  # the client gave up before its request was whole
            return
        conn.received += chunk
        if request_complete(conn.received):
            conn.pending = memoryview(respond(bytes(conn.received), self._render))
        elif len(conn.received) >= REQUEST_LIMIT_BYTES:
            conn.pending = memoryview(_response("431 Request Header Fields Too Large", b"request too large\n"))
        else:
            return
        self._send(fd, conn)  # most answers fit the socket buffer: sent now, no second wake-up

    def _send(self, fd: int, conn: _Connection) -> None:
        assert conn.pending is not None
        try:
            sent = conn.sock.send(conn.pending, socket.MSG_NOSIGNAL)  # EPIPE, never SIGPIPE
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(fd)
            return
        conn.pending = conn.pending[sent:]
        if not conn.pending:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)  # the FIN after the last byte, then close
            self._close(fd)

    def _close(self, fd: int) -> None:
        conn = self._connections.pop(fd, None)
        if conn is not None:
            conn.sock.close()


def _bind_unix(sock: socket.socket, path: str) -> tuple[int, int]:
    """Bind at ``path``: a stale socket there (a daemon that was killed) is replaced; anything
    else (a file, a symlink) is never removed. Returns the new socket's (st_dev, st_ino)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{path} exists and is not a socket")
        os.unlink(path)
    # bind() creates the node with 0777 & ~umask; the daemon is single-threaded, so a umask
    # set around it affects nothing else (a chmod after it would follow a swapped symlink).
    old = os.umask(0o777 & ~UNIX_SOCKET_MODE)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    st = os.lstat(path)
    return st.st_dev, st.st_ino
