"""Metrics on real files and sockets (issue 17): the textfile is never seen half-written and never
written through a symlink; the listener answers GET /metrics and no client can stall the loop."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from uoomd.metrics.collector import Metrics
from uoomd.metrics.exposition import CONTENT_TYPE
from uoomd.metrics.listener import CONNECTION_DEADLINE_S, MAX_CONNECTIONS, ListenAddress, MetricsListener
from uoomd.metrics.textfile import TextfileExporter, TextfileRefused, remove_textfile, write_textfile

pytestmark = pytest.mark.integration

# Two payloads of different sizes, each ending in its own marker: a torn read is a read that
# is neither (a truncated file, the start of one and the end of the other, empty).
PAYLOAD_A = b"".join(b"uoomd_a_%d 1\n" % i for i in range(4_000)) + b"# end a\n"
PAYLOAD_B = b"".join(b"uoomd_b_%d 22\n" % i for i in range(12_000)) + b"# end b\n"

READER = textwrap.dedent(
    """
    import json, os, sys
    path, stop = sys.argv[1], sys.argv[2]
    good = {open(p, "rb").read() for p in sys.argv[3:]}
    reads = torn = missing = 0
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            missing += 1  # only before the first write, or the rename was not atomic
            continue
        reads += 1
        if data not in good:
            torn += 1
    print(json.dumps({"reads": reads, "torn": torn, "missing": missing}))
    """
)


def test_the_textfile_is_never_seen_half_written(tmp_path: Path) -> None:
    target = tmp_path / "uoomd.prom"
    stop = tmp_path / "stop"
    (tmp_path / "a").write_bytes(PAYLOAD_A)
    (tmp_path / "b").write_bytes(PAYLOAD_B)
    write_textfile(str(target), PAYLOAD_A)  # there before the reader starts: it must never go missing
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(target), str(stop), str(tmp_path / "a"), str(tmp_path / "b")],
        stdout=subprocess.PIPE,
    )
    try:
        for i in range(400):
            write_textfile(str(target), PAYLOAD_B if i % 2 else PAYLOAD_A)
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    seen = json.loads(out)
    assert seen["reads"] > 0
    assert seen["torn"] == 0
    assert seen["missing"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "stop", "uoomd.prom"]  # no temp file left


def test_the_textfile_is_mode_0644_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "uoomd.prom"
    old = os.umask(0o077)
    try:
        write_textfile(str(target), b"x 1\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_bytes() == b"x 1\n"


def test_a_symlink_at_the_textfile_is_refused_and_what_it_points_to_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root:*:19000::::::\n")
    link = tmp_path / "uoomd.prom"
    link.symlink_to(victim)
    with pytest.raises(TextfileRefused, match="symlink"):
        write_textfile(str(link), b"x 1\n")
    assert victim.read_bytes() == b"root:*:19000::::::\n"
    assert link.is_symlink()


@pytest.mark.parametrize("depth", ["last", "middle"])
def test_a_symlinked_directory_on_the_way_is_refused(tmp_path: Path, depth: str) -> None:
    real = tmp_path / "etc"
    (real / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    path = tmp_path / "link" / "uoomd.prom" if depth == "last" else tmp_path / "link" / "sub" / "uoomd.prom"
    with pytest.raises(TextfileRefused, match="symlink"):
        write_textfile(str(path), b"x 1\n")
    assert list(real.rglob("*.prom")) == []
    assert list(real.rglob(".*")) == []  # not even a temp file


@pytest.mark.parametrize("name", ["uoomd.txt", "uoomd.prom.tmp", "uoomd"])
def test_a_file_node_exporter_would_not_read_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(TextfileRefused, match=r"\.prom"):
        write_textfile(str(tmp_path / name), b"x 1\n")


def test_a_directory_at_the_textfile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "uoomd.prom").mkdir()
    with pytest.raises(TextfileRefused, match="not a regular file"):
        write_textfile(str(tmp_path / "uoomd.prom"), b"x 1\n")


def test_the_exporter_writes_on_change_at_most_every_interval_and_a_heartbeat(tmp_path: Path) -> None:
    target = tmp_path / "uoomd.prom"
    metrics = Metrics(wall_clock=lambda: 1.0)
    exporter = TextfileExporter(str(target), interval_s=5.0, heartbeat_s=60.0)

    def tick(now: float, *, sleep_s: float | None = None, busy: bool = False) -> bytes:
        if sleep_s is not None:
            metrics.observe_sleep(sleep_s)
        assert exporter.maybe_write(now, metrics, busy=busy) is None
        return target.read_bytes()

    first = tick(100.0, sleep_s=1.0)
    assert b"uoomd_poll_interval_seconds 1.0" in first
    assert tick(102.0, sleep_s=2.0) == first  # changed, within the interval: not yet
    assert b"uoomd_poll_interval_seconds 2.0" in tick(105.0)  # the interval passed: the change is written
    mtime = target.stat().st_mtime_ns
    tick(140.0)  # nothing changed: not rewritten
    assert target.stat().st_mtime_ns == mtime
    before = target.read_bytes()
    assert tick(150.0, sleep_s=3.0, busy=True) == before  # a guard is acting: the change waits
    assert b"uoomd_poll_interval_seconds 3.0" in tick(165.0, busy=True)  # but the heartbeat writes
    list(text_string_to_metric_families(target.read_text()))


def test_a_failed_write_is_reported_and_tried_again_later(tmp_path: Path) -> None:
    target = tmp_path / "collector" / "uoomd.prom"
    metrics = Metrics(wall_clock=lambda: 1.0)
    exporter = TextfileExporter(str(target), interval_s=5.0)
    failed = exporter.maybe_write(0.0, metrics, busy=False)
    assert failed is not None
    assert not failed.refused
    assert "No such file" in failed.error
    (tmp_path / "collector").mkdir()  # node_exporter installed later
    metrics.observe_sleep(1.0)
    assert exporter.maybe_write(1.0, metrics, busy=False) is None  # not at every tick
    assert not target.exists()
    assert exporter.maybe_write(5.0, metrics, busy=False) is None
    assert target.exists()


def test_a_clean_stop_removes_the_textfile_but_never_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "uoomd.prom"
    write_textfile(str(target), b"x 1\n")
    remove_textfile(str(target))
    assert not target.exists()
    other = tmp_path / "other"
    other.write_text("keep")
    target.symlink_to(other)
    remove_textfile(str(target))
    assert target.is_symlink()
    assert other.read_text() == "keep"


# --- the listener -------------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail the test, rather than hang it, if a call blocks: the loop must never wait on a client."""

    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise AssertionError(f"blocked for {seconds} s: a listener call waited on a client")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pump(listener: MetricsListener, *, now: float = 0.0, rounds: int = 1) -> None:
    """What the daemon's wait() does: poll the listener's fds with the rest, handle each event."""
    for _ in range(rounds):
        poller = select.poll()
        for fd, mask in listener.poll_fds(now).items():
            poller.register(fd, mask)
        for fd, revents in poller.poll(10):
            assert listener.owns(fd)
            listener.handle(fd, revents, now)


def loop_until(listener: MetricsListener, done: Callable[[], bool], *, rounds: int = 500) -> None:
    for _ in range(rounds):
        if done():
            return
        pump(listener)
    raise AssertionError("the loop never got there")


def http_get(connect: Callable[[], socket.socket], listener: MetricsListener, request: bytes) -> bytes:
    """A client in this process: send, then let the loop run until the answer is whole."""
    client = connect()
    client.setblocking(False)
    client.sendall(request)
    answer = bytearray()
    closed = False

    def read() -> bool:
        nonlocal closed
        with contextlib.suppress(BlockingIOError):
            while chunk := client.recv(65536):
                answer.extend(chunk)
            closed = True
        return closed

    loop_until(listener, read)
    client.close()
    return bytes(answer)


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics(wall_clock=lambda: 1.0)
    m.observe_sleep(0.5)
    return m


@pytest.fixture
def tcp(metrics: Metrics) -> Iterator[tuple[MetricsListener, Callable[[], socket.socket]]]:
    listener = MetricsListener.open(ListenAddress(family=socket.AF_INET, host="127.0.0.1", port=0), metrics.exposition)
    port = listener.bound_port()
    try:
        yield listener, lambda: socket.create_connection(("127.0.0.1", port))
    finally:
        listener.close()


def test_the_listener_serves_the_exposition_over_tcp(
    tcp: tuple[MetricsListener, Callable[[], socket.socket]], metrics: Metrics
) -> None:
    listener, connect = tcp
    with watchdog(20):
        answer = http_get(connect, listener, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        assert f"Content-Type: {CONTENT_TYPE}".encode() in head
        assert body == metrics.exposition()
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert "uoomd_poll_interval_seconds" in names
        assert http_get(connect, listener, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404")


def test_the_listener_serves_a_unix_socket_of_mode_0666_and_removes_it_at_close(
    tmp_path: Path, metrics: Metrics
) -> None:
    path = tmp_path / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a daemon that was SIGKILLed left its socket behind
    stale.close()
    listener = MetricsListener.open(ListenAddress(family=socket.AF_UNIX, path=str(path)), metrics.exposition)
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o666

        def connect() -> socket.socket:
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(path))
            return client

        with watchdog(20):
            answer = http_get(connect, listener, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 200 OK")
        assert answer.endswith(metrics.exposition())
    finally:
        listener.close()
    assert not path.exists()


def test_a_file_at_the_unix_socket_path_is_never_removed(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "metrics.sock"
    path.write_text("precious")
    with pytest.raises(ValueError, match="not a socket"):
        MetricsListener.open(ListenAddress(family=socket.AF_UNIX, path=str(path)), metrics.exposition)
    assert path.read_text() == "precious"


def test_silent_and_slow_clients_never_stall_the_loop() -> None:
    # An answer larger than any socket buffer here (tcp_wmem max 4 MiB): the hoarder's can never be sent whole.
    body = b"uoomd_x 1\n" * (1 << 20)
    listener = MetricsListener.open(ListenAddress(family=socket.AF_INET, host="127.0.0.1", port=0), lambda: body)
    port = listener.bound_port()

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port))

    try:
        serve_despite_stalled_clients(listener, connect, body)
    finally:
        listener.close()


def serve_despite_stalled_clients(listener: MetricsListener, connect: Callable[[], socket.socket], body: bytes) -> None:
    with watchdog(60):
        silent = connect()  # connects and sends nothing
        half = connect()
        half.sendall(b"GET /metr")  # half a request, then nothing
        hoarder = socket.socket()
        hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        hoarder.connect(("127.0.0.1", listener.bound_port()))
        hoarder.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")  # asks, and never reads its answer
        pump(listener, rounds=20)  # the loop runs with all three connected...
        # ... and still serves a good scraper at once
        answer = http_get(connect, listener, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert answer.endswith(body)
        # Past their deadline the loop closes them: each sees the end of its connection.
        assert listener.open_connections == 3
        listener.expire(CONNECTION_DEADLINE_S)
        assert listener.open_connections == 0
        for client in (silent, half):
            client.settimeout(5)
            assert client.recv(1) == b""
            client.close()
        hoarder.close()


def test_a_connection_flood_keeps_at_most_max_connections(
    tcp: tuple[MetricsListener, Callable[[], socket.socket]],
) -> None:
    listener, _ = tcp
    clients = []
    with watchdog(20):
        for _ in range(MAX_CONNECTIONS * 3):
            client = socket.socket()
            client.setblocking(False)  # a flood does not wait for accept(): neither does this test
            client.connect_ex(("127.0.0.1", listener.bound_port()))
            clients.append(client)
            pump(listener)
        pump(listener, rounds=20)
    assert listener.open_connections == MAX_CONNECTIONS
    for client in clients:
        client.close()
