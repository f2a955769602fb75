"""docs/metrics.md documents every metric a real endpoint exports, and maps Triton's names."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.observability.conftest import LiveMetrics

DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
TRITON = (
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us", "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes", "nv_cpu_utilization",
)


def test_every_exported_metric_is_documented(live_metrics: LiveMetrics) -> None:
    text = DOCS.read_text()
    missing = []
    for family in text_string_to_metric_families(live_metrics.scrape()):
        if family.name.endswith("_created"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        if f"`{name}`" not in text:
            missing.append(name)
    assert not missing, f"docs/metrics.md does not document {missing}"


def test_triton_names_are_mapped() -> None:
    text = DOCS.read_text()
    assert [n for n in TRITON if n not in text] == []


def test_label_table_lists_every_drop_reason() -> None:
    """The `reason` row of the label table names every value server.metrics may emit, no other."""
    import re

    from server.metrics import DROP_REASONS

    row = next(line for line in DOCS.read_text().splitlines() if line.startswith("| `reason` |"))
    values = row.split("|")[2]
    documented = set(re.findall(r"`(\w+)`", values))
    assert documented == set(DROP_REASONS)
