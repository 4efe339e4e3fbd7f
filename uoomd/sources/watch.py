"""A guard's open sources: its memory reader, pressure file and PSI triggers, read once per poll into a GuardReading.

A cgroup scope can go away (a service restart removes it): its files are then closed, the
guard reads nothing, and the cgroup is looked for again until it is back and reopened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from uoomd.decision import describe_psi
from uoomd.errors import SetupError
from uoomd.logs import Log, OnError
from uoomd.plan import GuardPlan, PsiKind
from uoomd.readings import GuardReading, MemoryReading, PressureReading
from uoomd.sources import cgroup as cgroup_source
from uoomd.sources.meminfo import MeminfoError
from uoomd.sources.psi import PressureFileGone, PressureReader, PsiKindName, PsiTrigger, PsiTriggerGone, TriggerMode
from uoomd.sources.scope import open_memory_reader
from uoomd.thrash import RefaultMeter, advance, gate_bytes_per_s, has_refault_gate

# A guard whose cgroup was removed (a service restart) looks for it again at most this often:
# a missing cgroup costs one stat per retry, and a restarted service is guarded within this.
SCOPE_RETRY_S = 0.5


class MemoryReader(Protocol):
    """What a watch needs of its memory source: /proc/meminfo's reader, a cgroup's, or a test's."""

    def read(self) -> MemoryReading: ...
    def close(self) -> None: ...


@dataclass(slots=True)
class GuardWatch:
    """The open sources of one guard, and what the loop remembers of its last reading."""

    guard: GuardPlan
    memory: MemoryReader
    pressure: PressureReader | None
    triggers: tuple[PsiTrigger | None, ...]
    previous: MemoryReading | None = None
    previous_at: float = 0.0
    last: MemoryReading | None = None
    last_at: float = 0.0
    last_pressure: PressureReading | None = None
    psi_event_seen: bool = False  # a kernel trigger's fd signalled since the last reading
    gone_at: float | None = None  # when its cgroup was removed; its files stay closed until it is back
    retry_at: float = 0.0  # when reopen() looks for a gone cgroup next
    refaults: RefaultMeter = field(default_factory=RefaultMeter)  # at every reading, light ones too

    @property
    def has_polled_trigger(self) -> bool:
        """A PSI trigger the kernel refused: it needs the pressure file read at every poll."""
        return any(t is not None and t.mode is TriggerMode.POLLED for t in self.triggers)

    def remember(self, memory: MemoryReading, now: float) -> None:
        """Keep this reading and the one before it, for pacing's fall rate."""
        if self.last is not None:
            self.previous, self.previous_at = self.last, self.last_at
        self.last, self.last_at = memory, now
        gate = gate_bytes_per_s(self.guard, memory.total_bytes)
        self.refaults = advance(self.refaults, memory.refault_bytes, now, gate_bytes_per_s=gate)

    def mark_gone(self, now: float, log: Log, *, error: str) -> None:
        """The cgroup was removed: close every kept file, forget its readings, look for it later.

        Its fds are dead for good (ENODEV, even once a cgroup of that name exists again:
        see CgroupGone), and a dead trigger fd polls POLLERR for ever (kernfs_fop_poll()),
        which would spin the loop; closed, wait() leaves them out of the poll set."""
        self.close()
        self.pressure = None
        self.triggers = tuple(None for _ in self.triggers)
        self.previous = self.last = None
        self.refaults = RefaultMeter()
        self.last_pressure = None
        self.psi_event_seen = False
        self.gone_at = now
        self.retry_at = now + SCOPE_RETRY_S  # not at once: systemd removes a unit's hierarchies one by one
        log.warning("scope_gone", guard=self.guard.name, scope=self.guard.scope.describe(), error=error)

    def reopen(self, *, proc_root: str, now: float, log: Log) -> bool:
        """Whether the scope's files are open; a gone cgroup is looked for (one stat) at most
        every SCOPE_RETRY_S, and once back its files are reopened and its triggers re-armed."""
        if self.gone_at is None:
            return True
        if now < self.retry_at:
            return False
        self.retry_at = now + SCOPE_RETRY_S
        assert self.guard.scope.cgroup_path is not None  # only a cgroup goes
        if not cgroup_source.cgroup_exists(self.guard.scope.cgroup_path):
            return False
        try:
            fresh = open_sources(self.guard, proc_root=proc_root, now=now)
        except (SetupError, OSError, ValueError, PressureFileGone):
            return False  # gone again, or not all there yet: the next retry sees
        self.memory, self.pressure, self.triggers = fresh.memory, fresh.pressure, fresh.triggers
        gone_s, self.gone_at = now - self.gone_at, None
        log.info(
            "scope_back",
            guard=self.guard.name,
            scope=self.guard.scope.describe(),
            gone_s=round(gone_s, 3),
            psi=[str(t.mode) if t is not None else "unavailable" for t in self.triggers],
        )
        return True

    def read(self, now: float, *, proc_root: str, log: Log, on_error: OnError) -> GuardReading | None:
        """This poll's reading: memory always, the PSI triggers that fired; None when there is none
        (the cgroup is gone, or its memory could not be read: ``on_error`` said so)."""
        name = self.guard.name
        if not self.reopen(proc_root=proc_root, now=now, log=log):
            return None  # its cgroup is gone: no reading, so the core does nothing for it
        try:
            memory = self.memory.read()
        except cgroup_source.CgroupGone as exc:
            self.mark_gone(now, log, error=str(exc))
            return None
        except (OSError, MeminfoError, cgroup_source.CgroupError) as exc:
            on_error(f"memory:{name}", event="reading_failed", guard=name, source="memory", error=str(exc))
            return None
        fired: list[int] = []
        pressure: PressureReading | None = None
        # The pressure file is read only when a trigger needs it: a polled trigger computes its
        # window from it, and a kernel event is confirmed against it. Reading it at every poll
        # would delay the kernel's own unprivileged triggers (see uoomd/sources/psi.py).
        needs_reading = self.psi_event_seen or self.has_polled_trigger
        self.psi_event_seen = False
        try:
            if self.pressure is not None and needs_reading:
                pressure = self.pressure.read()
            for index, trigger in enumerate(self.triggers):
                if trigger is None:
                    continue
                try:
                    if trigger.fired(now, pressure):
                        fired.append(index)
                except PsiTriggerGone as exc:
                    self.drop_trigger(trigger, exc, now=now, log=log)
                    if self.gone_at is not None:
                        return None  # the cgroup went since the memory reading
        except PressureFileGone as exc:
            if self.guard.scope.cgroup_path is not None:
                self.mark_gone(now, log, error=str(exc))  # drop_trigger() says why
                return None
            on_error(f"psi:{name}", event="reading_failed", guard=name, source="psi", error=str(exc))
        except (OSError, ValueError) as exc:
            on_error(f"psi:{name}", event="reading_failed", guard=name, source="psi", error=str(exc))
        for index in fired:
            log.info(
                "trigger_fired",
                guard=name,
                trigger=describe_psi(index, self.guard.psi[index]),
                available_bytes=memory.available_bytes,
            )
        self.remember(memory, now)
        self.last_pressure = pressure or self.last_pressure
        return GuardReading(
            guard=name,
            memory=memory,
            pressure=pressure,
            psi_fired=tuple(fired),
            refault_rate=self.refaults.rate,
            refault_above_since=self.refaults.above_since,
        )

    def note_revents(self, trigger: PsiTrigger, revents: int, *, now: float, log: Log) -> None:
        """What poll() said of one of our trigger fds."""
        if self.gone_at is not None:
            return  # marked gone by an earlier event of this poll: its fds are closed
        self.psi_event_seen = True
        try:
            trigger.note_revents(revents)
        except PressureFileGone as exc:
            self.drop_trigger(trigger, exc, now=now, log=log)

    def drop_trigger(self, trigger: PsiTrigger, exc: Exception, *, now: float, log: Log) -> None:
        """Close a trigger whose pressure file went away (its cgroup was removed). Such a file
        polls POLLERR for ever (kernfs_fop_poll() on a removed node, Linux 6.18): kept in the
        poll set it wakes the loop at once, every time, and the daemon spins at 100 % CPU.

        For a cgroup the whole scope is gone then (mark_gone(): one scope_gone, every file
        closed, reopen() re-arms it later), even while a hybrid machine's v1 memory cgroup is
        still there: systemd removes a unit's v2 cgroup first and its v1 ones after it
        (cg_trim_everywhere()), and a v2 cgroup with members cannot be removed at all."""
        if self.gone_at is not None:
            return
        if self.guard.scope.cgroup_path is not None:
            self.mark_gone(now, log, error=str(exc))
            return
        self.triggers = tuple(None if t is trigger else t for t in self.triggers)
        trigger.close()
        log.warning("psi_trigger_gone", guard=self.guard.name, path=trigger.path, error=str(exc))

    def close(self) -> None:
        self.memory.close()
        if self.pressure is not None:
            self.pressure.close()
        for trigger in self.triggers:
            if trigger is not None:
                trigger.close()


class _Absent:
    """The memory reader of a guard whose cgroup is not there: never read (the watch is gone)."""

    def read(self) -> MemoryReading:
        raise AssertionError("a gone scope is not read")  # pragma: no cover - reopen() guards it

    def close(self) -> None:
        pass


def open_watch(guard: GuardPlan, *, proc_root: str, now: float, log: Log, refaults: bool = False) -> GuardWatch:
    """Open a guard's sources; a PSI trigger the kernel refuses falls back to polling, and says so.

    A cgroup that does not exist yet (its service starts after uoomd, or is between restarts)
    is watched as gone: scope_gone now, scope_back once it appears and is reopened. Refusing
    to start would leave every other guard down too (seen in the VM with a slice that
    systemd creates only when its first unit starts)."""
    path = guard.scope.cgroup_path
    if path is not None and not cgroup_source.cgroup_exists(path):
        watch = GuardWatch(guard=guard, memory=_Absent(), pressure=None, triggers=(None,) * len(guard.psi))
        watch.mark_gone(now, log, error=f"{path} does not exist")
        watch.retry_at = now  # looked for at the first poll: it may appear at any moment
        return watch
    watch = open_sources(guard, proc_root=proc_root, now=now, refaults=refaults)
    if guard.psi and watch.pressure is None:
        log.warning("psi_unavailable", guard=guard.name, scope=guard.scope.describe(), triggers=len(guard.psi))
    for index, trigger in enumerate(watch.triggers):
        if trigger is not None:
            log.info(
                "psi_trigger_armed",
                guard=guard.name,
                trigger=index,
                path=trigger.path,
                mode=str(trigger.mode),
                kind=trigger.kind,
                stall_us=trigger.stall_us,
                window_us=trigger.window_us,
                reason=trigger.reason,
            )
    return watch


def open_sources(guard: GuardPlan, *, proc_root: str, now: float, refaults: bool = False) -> GuardWatch:
    """A guard's sources, opened without a word logged; when one fails, none stays open (a
    gone cgroup is retried every SCOPE_RETRY_S: a leak there would be an fd per retry).
    The refault count is read where the guard has a refault gate, or ``refaults`` asks
    (a recording: any policy may be replayed on it)."""
    watch = GuardWatch(
        guard=guard,
        memory=open_memory_reader(guard.scope, proc_root, refaults=refaults or has_refault_gate(guard)),
        pressure=None,
        triggers=(None,) * len(guard.psi),
    )
    armed: list[PsiTrigger] = []
    try:
        path = cgroup_source.pressure_path_for(guard.scope, proc_root) if guard.psi else None
        if path is not None:
            watch.pressure = PressureReader(path)
            initial = watch.pressure.read()
            for plan_trigger in guard.psi:
                kind: PsiKindName = "some" if plan_trigger.kind is PsiKind.SOME else "full"
                armed.append(
                    PsiTrigger.arm(path, kind, plan_trigger.stall_us, plan_trigger.window_us, now=now, initial=initial)
                )
            watch.triggers = tuple(armed)
    except BaseException:
        for trigger in armed:
            trigger.close()
        watch.close()
        raise
    return watch
