"""The README's metric table (Monitoring) is the registry: every family once, with its type,
labels and help text as the code has them, in the code's order; and the label values it
lists are the ones the code can produce."""

from __future__ import annotations

import re

import pytest

from tests import readme
from uoomd.decision import Phase
from uoomd.metrics.collector import FAMILIES

pytestmark = pytest.mark.unit


def _monitoring() -> str:
    return readme.section(readme.README.read_text(), "Monitoring")


def documented_families() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(name, type, labels, what) per row of the table whose first header is ``metric``."""
    rows = readme.table(_monitoring(), "metric")
    out = []
    for name, kind, labels, what in rows:
        assert re.fullmatch(r"`[a-z0-9_]+`", name), f"{name}: a metric name in backticks"
        out.append((name.strip("`"), kind, () if labels == "—" else tuple(labels.split(", ")), what))
    return out


def test_the_readme_metric_table_is_the_registry() -> None:
    code = [(f.name, f.kind, f.labels, f.help) for f in FAMILIES]
    assert documented_families() == code, "regenerate the table from uoomd/metrics/collector.py FAMILIES"


def test_the_documented_phases_are_the_machines_phases() -> None:
    paragraph = _monitoring().split("Label values:", 1)[1].split("\n\n", 1)[0]
    phases = paragraph.split("`phase` is", 1)[1].split(";", 1)[0]
    assert set(re.findall(r"`([a-z_]+)`", phases)) == {str(p) for p in Phase}
