"""Metric families and their current values: counters that never go down, gauges, histograms (pure).

A :class:`Registry` outlives the policy: a reload changes which series are fed, never the
value of a counter (Prometheus reads a counter that goes down as a restart). Values can be
dumped to JSON and loaded back, so ``uoomd status --metrics`` renders what the daemon kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]
LabelValues = tuple[str, ...]

# Prometheus data model: metric and label names. A label starting with "__" is reserved.
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Suffixes the text format derives from a histogram's name: a family must not collide with them.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One metric: its name, type, help text, label names and (histograms) bucket bounds."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histogram upper bounds, ascending; +Inf is implied

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"{self.name!r} is not a Prometheus metric name")
        if (self.kind == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: a counter's name ends in _total, and only a counter's")
        if self.kind == "histogram" and self.name.endswith(_HISTOGRAM_SUFFIXES):
            raise ValueError(f"{self.name}: a histogram's name must not end in {_HISTOGRAM_SUFFIXES}")
        for label in self.labels:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: {label!r} is not a label name")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: a label name repeats")
        if self.kind == "histogram":
            if "le" in self.labels:
                raise ValueError(f"{self.name}: 'le' is the histogram's own label")
            if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
                raise ValueError(f"{self.name}: buckets must be given, ascending, without repeats")
            if not all(math.isfinite(b) for b in self.buckets):
                raise ValueError(f"{self.name}: +Inf is implied; buckets are finite")
        elif self.buckets:
            raise ValueError(f"{self.name}: only a histogram has buckets")


@dataclass(slots=True)
class HistogramValue:
    """Observations per bucket (not cumulative; the last slot is +Inf), their sum and count."""

    counts: list[int]
    sum: float = 0.0
    count: int = 0

    def cumulative(self) -> Iterator[int]:
        total = 0
        for c in self.counts:
            total += c
            yield total


Value = int | float


@dataclass(slots=True)
class _Series:
    family: Family
    values: dict[LabelValues, Value] = field(default_factory=dict)
    histograms: dict[LabelValues, HistogramValue] = field(default_factory=dict)
    generation: int = 0  # moves when one of this family's values does


class Registry:
    """The current value of every series, and a ``generation`` that moves whenever one changes.

    ``generation`` lets a writer skip rendering when nothing moved (a gauge set to the value
    it had is no change); :meth:`family_generation` lets it render again only the families
    that did."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._series: dict[str, _Series] = {}
        for family in families:
            if family.name in self._series:
                raise ValueError(f"{family.name}: registered twice")
            self._series[family.name] = _Series(family)
        self.generation = 0

    # -- writing

    def inc(self, name: str, labels: LabelValues = (), amount: Value = 1) -> None:
        """Add to a counter; a negative or non-finite amount is a bug, and raises."""
        series = self._get(name, "counter", labels)
        if not (amount >= 0 and math.isfinite(amount)):
            raise ValueError(f"{name}: a counter only goes up (amount {amount!r})")
        series.values[labels] = series.values.get(labels, 0) + amount
        self._moved(series)

    def ensure(self, name: str, labels: LabelValues = ()) -> None:
        """Create a counter's (or histogram's) series at 0 if it does not exist yet: a series
        that appears at 1 hides its first increase from ``increase()``, and so from an alert on it."""
        kind = self._series[name].family.kind
        if kind == "histogram":
            series = self._get(name, "histogram", labels)
            if labels not in series.histograms:
                series.histograms[labels] = HistogramValue(counts=[0] * (len(series.family.buckets) + 1))
                self._moved(series)
            return
        series = self._get(name, "counter", labels)
        if labels not in series.values:
            series.values[labels] = 0
            self._moved(series)

    def set(self, name: str, labels: LabelValues, value: Value) -> None:
        series = self._get(name, "gauge", labels)
        if series.values.get(labels) != value:
            series.values[labels] = value
            self._moved(series)

    def observe(self, name: str, labels: LabelValues, value: float) -> None:
        series = self._get(name, "histogram", labels)
        self.ensure(name, labels)
        hist = series.histograms[labels]
        slot = next((i for i, bound in enumerate(series.family.buckets) if value <= bound), len(series.family.buckets))
        hist.counts[slot] += 1
        hist.sum += value
        hist.count += 1
        self._moved(series)

    def remove(self, name: str, labels: LabelValues) -> None:
        """Drop a gauge's series (its guard is gone, or its value unknown). Counters stay."""
        series = self._get(name, "gauge", labels)
        if series.values.pop(labels, None) is not None:
            self._moved(series)

    def remove_matching(self, name: str, label: str, value: str) -> None:
        """Drop every series of a gauge whose ``label`` is ``value`` (all of a removed guard's)."""
        series = self._series[name]
        if series.family.kind != "gauge":
            raise TypeError(f"{name} is a {series.family.kind}: only a gauge's series are removed")
        index = series.family.labels.index(label)
        gone = [k for k in series.values if k[index] == value]
        for key in gone:
            del series.values[key]
        if gone:
            self._moved(series)

    def _moved(self, series: _Series) -> None:
        series.generation += 1
        self.generation += 1

    def _get(self, name: str, kind: MetricKind, labels: LabelValues) -> _Series:
        series = self._series[name]
        if series.family.kind != kind:
            raise TypeError(f"{name} is a {series.family.kind}, not a {kind}")
        if len(labels) != len(series.family.labels):
            raise ValueError(f"{name}: labels {series.family.labels}, got {len(labels)} values")
        return series

    # -- reading

    def value(self, name: str, labels: LabelValues = ()) -> Value | None:
        return self._series[name].values.get(labels)

    def series(self, name: str) -> Mapping[LabelValues, Value]:
        return self._series[name].values

    def family_generation(self, name: str) -> int:
        """Moves whenever a value of the family ``name`` changes."""
        return self._series[name].generation

    def family_list(self) -> tuple[Family, ...]:
        """Every family, in registration order."""
        return tuple(series.family for series in self._series.values())

    def histograms(self, name: str) -> list[tuple[LabelValues, HistogramValue]]:
        """A histogram's series, sorted by label values."""
        return sorted(self._series[name].histograms.items())

    # -- the state file

    def dump(self) -> dict[str, list[list[object]]]:
        """Every series as JSON-ready lists: ``{name: [[labels, value], ...]}``; a histogram's
        value is ``[counts, sum, count]``."""
        out: dict[str, list[list[object]]] = {}
        for name, series in self._series.items():
            rows: list[list[object]] = [[list(k), v] for k, v in series.values.items()]
            rows += [[list(k), [list(h.counts), h.sum, h.count]] for k, h in series.histograms.items()]
            if rows:
                out[name] = rows
        return out

    def load(self, dumped: object) -> None:
        """Take the values of :meth:`dump` from a file: every type checked, and a family this
        version does not know skipped (a daemon of another version than the command that reads it).
        Raises ValueError naming the first problem; nothing is changed then."""
        known = {name: rows for name, rows in _check_top(dumped).items() if name in self._series}
        loaded = [_check_rows(self._series[name].family, rows) for name, rows in known.items()]
        for family, values, histograms in loaded:
            self._series[family.name].values.update(values)
            self._series[family.name].histograms.update(histograms)
            self._moved(self._series[family.name])


def _check_top(dumped: object) -> dict[str, object]:
    if not isinstance(dumped, dict) or not all(isinstance(k, str) for k in dumped):
        raise ValueError("metrics: expected an object of metric names")
    return dumped


def _number(where: str, value: object) -> Value:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number")
    return value


def _check_rows(
    family: Family, rows: object
) -> tuple[Family, dict[LabelValues, Value], dict[LabelValues, HistogramValue]]:
    where = f"metrics.{family.name}"
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a list of [labels, value]")
    values: dict[LabelValues, Value] = {}
    histograms: dict[LabelValues, HistogramValue] = {}
    for index, row in enumerate(rows):
        at = f"{where}[{index}]"
        if not isinstance(row, list) or len(row) != 2:
            raise ValueError(f"{at}: expected [labels, value]")
        labels, value = row
        if not isinstance(labels, list) or len(labels) != len(family.labels):
            raise ValueError(f"{at}: expected {len(family.labels)} label values")
        if not all(isinstance(v, str) for v in labels):
            raise ValueError(f"{at}: label values are strings")
        key: LabelValues = tuple(labels)
        if family.kind == "histogram":
            histograms[key] = _check_histogram(at, family, value)
            continue
        number = _number(at, value)
        if family.kind == "counter" and not (number >= 0 and math.isfinite(number)):
            raise ValueError(f"{at}: a counter is finite and not negative")
        values[key] = number
    return family, values, histograms


def _check_histogram(at: str, family: Family, value: object) -> HistogramValue:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"{at}: expected [counts, sum, count]")
    counts, total, count = value
    if not isinstance(counts, list) or len(counts) != len(family.buckets) + 1:
        raise ValueError(f"{at}: expected {len(family.buckets) + 1} bucket counts")
    checked = [_number(at, c) for c in counts]
    if not all(isinstance(c, int) and c >= 0 for c in checked) or not isinstance(count, int) or count != sum(checked):
        raise ValueError(f"{at}: bucket counts are integers that add up to the count")
    return HistogramValue(counts=[int(c) for c in checked], sum=float(_number(at, total)), count=count)
