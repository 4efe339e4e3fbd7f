"""Where the daemon's metrics go: the textfile and the listener the policy names, reopened as a reload changes them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uoomd.logs import Log
from uoomd.metrics.collector import Metrics
from uoomd.plan import DaemonPlan

if TYPE_CHECKING:
    from uoomd.metrics.listener import MetricsListener
    from uoomd.metrics.textfile import TextfileExporter, WriteFailed


class MetricsOutlets:
    """The textfile exporter and the listener of one daemon; either may be None (not configured).

    Kept metrics that are not written cost an idle daemon 0.3 MiB of RSS and 0.05 s of CPU per
    hour; the textfile writer and the listener are imported only when configured
    (bench/metrics_idle.py, medians of 3 x 60 s on this 2-core VM; the README's Monitoring
    section has the rest)."""

    def __init__(self, metrics: Metrics, log: Log) -> None:
        self.metrics = metrics
        self.log = log
        self.textfile: TextfileExporter | None = None  # opened by configure(), changed by a reload
        self.listener: MetricsListener | None = None

    def configure(self, old: DaemonPlan | None, new: DaemonPlan) -> None:
        """The textfile exporter and the listener as ``new`` says: at start (``old`` None) and at
        each reload. A listener that cannot open is logged and left out: guarding goes on."""
        if old is None or old.metrics_file != new.metrics_file:
            if self.textfile is not None:
                self.textfile.remove()  # nobody would update it: node_exporter would serve it for ever
            self.textfile = None
            if new.metrics_file is not None:
                from uoomd.metrics.textfile import TextfileExporter  # noqa: PLC0415 -- see the class

                self.textfile = TextfileExporter(new.metrics_file, interval_s=new.metrics_interval_s)
        elif self.textfile is not None:
            self.textfile.interval_s = new.metrics_interval_s
        # Unchanged and open: kept (a scrape under way goes on). One that failed is tried again.
        if old is not None and old.metrics_listen == new.metrics_listen and self.listener is not None:
            return
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if new.metrics_listen is None:
            return
        from uoomd.metrics.listener import MetricsListener, parse_listen  # noqa: PLC0415 -- see the class

        try:
            self.listener = MetricsListener.open(parse_listen(new.metrics_listen), self.metrics.exposition)
        except (OSError, ValueError) as exc:
            error = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            self.log.warning("metrics_listen_failed", address=new.metrics_listen, error=error)
            return
        self.log.info("metrics_listening", address=self.listener.address.describe())

    def write(self, now: float, *, busy: bool) -> WriteFailed | None:
        """The textfile, when it is due (uoomd/metrics/textfile.py write_due); why it failed."""
        if self.textfile is None:
            return None
        return self.textfile.maybe_write(now, self.metrics, busy=busy)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.textfile is not None:
            # No file rather than one that goes on saying the last values: absent(uoomd_build_info).
            self.textfile.remove()
            self.textfile = None
