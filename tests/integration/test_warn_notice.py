"""A warning's desktop notice goes to the likely victim's owner only, over a real dbus-daemon."""

from __future__ import annotations

import os
import time

import pytest

# buses and run_user are test_service's fixtures (a temp /run/user, the buses started there).
from tests.integration.test_service import (  # noqa: F401
    NOBODY,
    FakeNotificationServer,
    RecordingLog,
    SessionBus,
    buses,
    run_user,
    settle,
    start_bus,
)
from uoomd.desktop import DesktopNotices, warn_notice

pytestmark = pytest.mark.integration


def test_a_warning_reaches_the_victims_owner_and_no_other_user(run_user: str, buses: list[SessionBus]) -> None:  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("a bus of another user needs root")
    mine = start_bus(run_user, os.geteuid())
    buses.append(mine)
    other = start_bus(run_user, NOBODY)
    buses.append(other)
    server = FakeNotificationServer(mine.path)
    try:
        log = RecordingLog()
        notices = DesktopNotices(log, run_user=run_user)
        summary, body = warn_notice({"name": "firefox", "rss_bytes": 2 << 30, "guard": "system"})
        notices.notify(summary, body, now=time.monotonic(), uid=os.geteuid())
        assert notices.running == 1, "one child: the owner's bus, not nobody's"
        settle(notices)
        (call,) = server.calls
        assert call.body[3] == "Memory low: firefox (2.0 GiB) will be stopped if this goes on"
        (sent,) = log.named("desktop_notice_sent")
        assert sent["uid"] == os.geteuid()
        assert not log.named("desktop_notice_failed"), "nothing was tried on nobody's bus"
    finally:
        server.close()


def test_an_owner_without_a_session_bus_is_a_log_line(run_user: str, buses: list[SessionBus]) -> None:  # noqa: F811
    buses.append(start_bus(run_user, os.geteuid()))
    log = RecordingLog()
    notices = DesktopNotices(log, run_user=run_user)
    notices.notify("s", "b", now=time.monotonic(), uid=4321)
    assert notices.running == 0
    (skipped,) = log.named("desktop_notice_skipped")
    assert (skipped["reason"], skipped["uid"]) == ("no session bus of that user", 4321)
