"""Catalogs where the models are: model replicas report what they can serve by name, the ingress
reads the reports.

A model replica whose task has a catalog (`Model.catalog`: LoRA versions, styles) publishes it to
Ray's cluster key-value store (the GCS) when it has loaded and then every `REPORT_S` from a thread
of its own (`Reporter`), under `catalog/<app>/<deployment>/<replica>` with the time it was made.
Reports older than `STALE_S` are ignored (a replica that died stops renewing its report). The
ingress and the job runner keep what they read for `ingress.catalog_ttl_s` (`Catalogs`), read again
at once when a request names something they do not know (at most once per `MIN_REFRESH_S`), and
never read a model directory themselves. With no report yet, a task's catalog is None: names are
checked for their form only and the replica that takes the request checks them again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deployments.task import Catalog

log = logging.getLogger("imgserve")

NAMESPACE = "imgserve"
REPORT_S = 5.0
"""How often a replica renews its report."""
STALE_S = 30.0
"""A report older than this is from a replica that is gone (or stuck)."""
MIN_REFRESH_S = 1.0
"""Unknown names read the reports again at most this often (a flood of bad names costs nothing)."""


@dataclass(frozen=True)
class Report:
    """One replica's catalog, as it published it."""

    replica: str
    at: float
    catalog: Catalog
    holds: tuple[str, ...] = ()
    """Names it keeps in memory now (resident LoRA versions, loaded styles)."""


def _key(app: str, deployment: str, replica: str = "") -> bytes:
    return f"catalog/{app}/{deployment}/{replica}".encode()


def publish(app: str, deployment: str, report: Report) -> None:
    """Write one replica's report to the cluster's key-value store (Ray must be initialised)."""
    from ray.experimental import internal_kv

    value = {"replica": report.replica, "at": report.at, "catalog": report.catalog.to_dict(), "holds": list(report.holds)}
    internal_kv._internal_kv_put(_key(app, deployment, report.replica), json.dumps(value).encode(), overwrite=True,
                                 namespace=NAMESPACE)


def read(app: str, deployment: str) -> list[Report]:
    """The fresh reports of `deployment`'s replicas, newest first ([] without Ray or reports)."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return []
    reports = []
    for key in internal_kv._internal_kv_list(_key(app, deployment), namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        try:
            value = json.loads(raw)
            report = Report(value["replica"], float(value["at"]), Catalog.from_dict(value["catalog"]),
                            tuple(value.get("holds", ())))
        except (ValueError, KeyError, TypeError):
            continue
        if time.time() - report.at > STALE_S:
            internal_kv._internal_kv_del(key, namespace=NAMESPACE)  # its replica is gone
            continue
        reports.append(report)
    return sorted(reports, key=lambda report: report.at, reverse=True)


class Catalogs:
    """The tasks' catalogs as one process (an ingress or job runner replica) knows them: read from
    the reports (`reader(deployment)`), kept `ttl_s`, read again at once for an unknown name."""

    def __init__(self, deployments: dict[str, str], reader: Callable[[str], list[Report]], ttl_s: float = 5.0) -> None:
        self.deployments = deployments
        """Task name → its model deployment's name, for the tasks that have a catalog."""
        self.reader = reader
        self.ttl_s = ttl_s
        self._read: dict[str, tuple[float, list[Report]]] = {}

    def stale(self, task: str, fresh: bool = False) -> bool:
        """Whether `task`'s reports are worth reading again: always while none had been reported
        (replicas still starting), else when read longer ago than `ttl_s` (`MIN_REFRESH_S` with
        `fresh`)."""
        at, reports = self._read.get(task, (float("-inf"), []))
        limit = MIN_REFRESH_S if fresh else self.ttl_s
        return task in self.deployments and (not reports or time.monotonic() - at > limit)

    def reports(self, task: str, fresh: bool = False) -> list[Report]:
        """The reports of `task`'s replicas, newest first; read again when `stale`."""
        if task not in self.deployments:
            return []
        reports = self._read.get(task, (0.0, []))[1]
        if self.stale(task, fresh):
            try:
                reports = self.reader(self.deployments[task])
            except Exception:  # noqa: BLE001 - the store unreachable: keep what was read, say so once
                log.warning("could not read the catalog reports of %s", task, exc_info=True)
            self._read[task] = (time.monotonic(), reports)
        return reports

    def get(self, task: str) -> Catalog | None:
        """`task`'s catalog as last read (its newest report's), or None when no replica had reported;
        reads nothing."""
        reports = self._read.get(task, (0.0, []))[1]
        return reports[0].catalog if reports else None


class Reporter:
    """A model replica's reporting thread: publishes `make()` now and every `every_s`."""

    def __init__(self, make: Callable[[], Report], send: Callable[[Report], None], every_s: float = REPORT_S) -> None:
        self.make, self.send, self.every_s = make, send, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog-reporter", daemon=True)

    def start(self) -> Reporter:
        self.report()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def report(self) -> None:
        try:
            self.send(self.make())
        except Exception:  # noqa: BLE001 - a failed report is retried next time; serving goes on
            log.warning("could not report this replica's catalog", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.report()


def replica_report(model: Any) -> Report:
    """The report of a loaded model replica: its catalog and what it holds in memory."""
    stats = model.extra_stats()
    holds = stats.get("adapters") or stats.get("styles") or []
    return Report(model.replica, time.time(), model.catalog(), tuple(holds))


def report_from(model: Any) -> Reporter | None:
    """Start reporting a loaded model replica's catalog (None: its task has none, or this is not a
    Serve replica)."""
    if getattr(model, "catalog", lambda: None)() is None:
        return None
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None
    return Reporter(lambda: replica_report(model), lambda report: publish(context.app_name, context.deployment, report),
                    min(REPORT_S, getattr(model, "catalog_every_s", REPORT_S))).start()
