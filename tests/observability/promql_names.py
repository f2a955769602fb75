"""Metric names a PromQL expression refers to, and the names a scrape exposes (test helper).

A small lexer, not a parser: it drops strings, label matchers, range / offset durations,
grouping clauses and Grafana variables, and what is left that is an identifier not followed
by "(" and not a PromQL keyword is a metric name. Enough for dashboard and rule expressions;
the end-to-end test additionally runs every expression through a real Prometheus.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

# Series Prometheus itself creates for every target, which no exporter exposes.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# Exported only on hosts with an NVIDIA GPU and pynvml (server/gpu_metrics.py).
GPU_ONLY = frozenset({
    "perception_gpu_utilization_ratio", "perception_gpu_memory_used_bytes", "perception_gpu_memory_total_bytes",
    "perception_gpu_power_watts",
})

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "le", "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\()?)")
_DURATION_OR_NUMBER = re.compile(r"\b\d[\w.]*")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, e.g. {"perception_frames_received_total"}."""
    s = _STRING.sub(" ", expr)
    s = _VARIABLE.sub(" 1 ", s)
    s = _MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    s = _DURATION_OR_NUMBER.sub(" ", s)
    names = set()
    for match in _IDENT.finditer(s):
        if match.group(1) or match.group(0).lower() in KEYWORDS:
            continue  # a function call or a keyword
        names.add(match.group(0))
    return names


def exposed_names(exposition: str) -> set[str]:
    """Every sample name in a text exposition (with _total / _bucket / _sum / _count suffixes)."""
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}
