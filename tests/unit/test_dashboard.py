"""The Grafana dashboard (cluster/grafana-dashboard.json) is valid and queries only metrics that
imgserve defines (`deployments.metrics`) or that the installed Ray Serve exports, so it cannot drift
silently from the code. (tests/serve/test_metrics.py also checks them against a real scrape.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from deployments import metrics
from tests.conftest import REPO

DASHBOARD = REPO / "cluster" / "grafana-dashboard.json"
_SERIES = re.compile(r"\b(ray_[A-Za-z0-9_]+)")
_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    found: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            found.extend(target["expr"] for target in panel.get("targets", []) if "expr" in target)
            panels(panel.get("panels", []))  # rows may hold collapsed panels

    panels(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            found.append(query)
    return found


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    return {name for query in queries(dashboard) for name in _SERIES.findall(query)}


def ray_serve_metric_names() -> set[str]:
    """Metric names the installed Ray Serve defines (string literals in its source), as exported:
    `ray_` + name, with any of Prometheus' type suffixes."""
    import ray.serve

    base: set[str] = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        if "tests" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        base.update(re.findall(r"[\"'](serve_[a-z0-9_]+)[\"']", text))
        for template in re.findall(r"f[\"'](serve_[a-z_]*\{protocol_name\}[a-z_]*)[\"']", text):
            base.update(template.replace("{protocol_name}", protocol) for protocol in ("http", "grpc"))
    return {f"ray_{name}{suffix}" for name in base for suffix in _SUFFIXES}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_datasource_variable(dashboard) -> None:
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, panels = set(), [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_dashboard_has_the_panels_an_operator_needs(dashboard) -> None:
    used = dashboard_metric_names(dashboard)
    needed = {
        "ray_imgserve_requests_total",           # request rate by task/status, error rate
        "ray_imgserve_request_seconds_bucket",   # end-to-end latency quantiles
        "ray_imgserve_stage_seconds_bucket",     # per-stage latency quantiles
        "ray_imgserve_rejections_total",
        "ray_imgserve_jobs_queued",
        "ray_imgserve_lora_events_total",
        "ray_imgserve_gpu_peak_bytes_bucket",
        "ray_serve_deployment_queued_queries",   # Serve's own queue depth
        "ray_serve_deployment_replica_healthy",  # replicas per deployment
    }
    assert needed <= used, sorted(needed - used)
    text = " ".join(queries(dashboard))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, task, stage) (rate(ray_imgserve_stage_seconds_bucket" in text


def test_dashboard_queries_only_metrics_the_code_defines_or_ray_serve_exports(dashboard) -> None:
    known = metrics.exported_names() | ray_serve_metric_names()
    unknown = dashboard_metric_names(dashboard) - known
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"


def test_the_check_itself_catches_a_misspelt_metric(dashboard) -> None:
    known = metrics.exported_names() | ray_serve_metric_names()
    broken = json.loads(json.dumps(dashboard).replace("ray_imgserve_rejections_total", "ray_imgserve_rejection_total"))
    assert dashboard_metric_names(broken) - known == {"ray_imgserve_rejection_total"}
