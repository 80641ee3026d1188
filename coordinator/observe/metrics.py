"""Prometheus metrics: the coordinator's ``/metrics`` (text exposition format), on its HTTP port.

Where each figure comes from, and so whether it survives a restart and agrees across frontends:

* from the ledger (Redis), read at every scrape, the same on every coordinator sharing it:
  tasks, jobs and adapters from the ledger-wide totals kept where the states change; the running
  jobs, the active workers (by card), tokens/s and the newest version from the summaries `nomoat
  status` shows (coordinator.observe.status), so a scrape costs O(active work), not O(history);
  and the counters of coordinator.ledger.counters, which survive a
  restart: leases, re-issues, expired leases, uploads (by outcome, bytes), refusals by stage and
  reason, folds and their duration. Several frontends report the same values: aggregate them
  with ``max``, not ``sum``.
* from this process only, reset by a restart: requests to the HTTP port and open live streams
  (:class:`ProcessMetrics`).

Every name is listed in :data:`EXPORTED`; deploy/grafana's dashboard uses only those (a test checks).
"""

from __future__ import annotations

import math
from collections import Counter as Count
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.observe import status
from coordinator.observe.dashboard import card
from coordinator.ledger import Ledger
from coordinator.ledger.records import TaskState
from coordinator.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LOSS_LOOKBACK = 20  # the newest versions searched for the newest held-out loss

# Every metric family this module exports (a counter's samples add _total, a histogram's
# _bucket, _sum and _count).
EXPORTED = (
    "nomoat_tasks", "nomoat_jobs", "nomoat_job_progress", "nomoat_leases", "nomoat_task_reissues",
    "nomoat_leases_expired", "nomoat_speculative_leases", "nomoat_uploads", "nomoat_upload_bytes",
    "nomoat_refusals", "nomoat_folds", "nomoat_gateway_bytes", "nomoat_fold_duration_seconds", "nomoat_versions",
    "nomoat_version_latest", "nomoat_version_eval_loss", "nomoat_adapters", "nomoat_workers",
    "nomoat_worker_tokens_per_second", "nomoat_worker_tasks_done", "nomoat_tokens_per_second",
    "nomoat_http_requests", "nomoat_http_streams",
)


class LedgerCollector(Collector):
    """Families read from the ledger at each scrape: the same summaries as `nomoat status`."""

    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self.ledger = ledger
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        totals = self.ledger.counters.totals()
        running = [j for j in (status.job(self.ledger, i) for i in self.ledger.jobs.running_ids()) if j]
        workers = status.workers(self.ledger, self.settings, gone=0)
        yield from _jobs(running, totals)
        yield from _workers(workers, self.ledger.workers.count())
        yield from _versions(self.ledger)
        yield from _counters(self.ledger)


def _jobs(running: list[status.JobSummary], totals: dict[str, int]) -> Iterator[Metric]:
    tasks = GaugeMetricFamily("nomoat_tasks", "Tasks of every job, by state.", labels=["state"])
    for state in TaskState:
        tasks.add_metric([state.value], totals[f"tasks:{state.value}"])
    yield tasks
    states = GaugeMetricFamily("nomoat_jobs", "Jobs, by state.", labels=["state"])
    states.add_metric(["running"], len(running))
    for state in ("done", "failed"):
        states.add_metric([state], totals[f"jobs:{state}"])
    yield states
    jobs = running
    done = GaugeMetricFamily("nomoat_job_progress", "Finished tasks over all tasks, of each running job.",
                             labels=["job", "name"])
    for job in jobs:
        if job.state == "running" and job.total_tasks:
            finished = job.tasks.get("done", 0) + job.tasks.get("failed", 0)
            done.add_metric([job.job_id, job.name], finished / job.total_tasks)
    yield done
    adapters = GaugeMetricFamily("nomoat_adapters", "Adapters of every job folded or rejected by the fold gates.",
                                 labels=["state"])
    adapters.add_metric(["folded"], totals["adapters:folded"])
    adapters.add_metric(["rejected"], totals["adapters:rejected"])
    yield adapters


def _workers(workers: list[status.WorkerSummary], registered: int) -> Iterator[Metric]:
    count = GaugeMetricFamily("nomoat_workers", "Workers ever registered: the active ones (heard from within three "
                              "lease lifetimes) by card and kind (ray: a trusted Ray node; outbound: a public "
                              "volunteer); the gone ones in one sample, card and kind \"any\".",
                              labels=["card", "kind", "state"])
    by_card = Count((card(w.card).get("name", "unknown"), w.kind, w.state) for w in workers if w.state == "active")
    for (name, kind, state), n in sorted(by_card.items()):
        count.add_metric([name, kind, state], n)
    count.add_metric(["any", "any", "gone"], max(0, registered - sum(by_card.values())))
    yield count
    speed = GaugeMetricFamily("nomoat_worker_tokens_per_second", "Measured training speed of each active worker.",
                              labels=["worker", "name", "card"])
    done = CounterMetricFamily("nomoat_worker_tasks_done", "Tasks each active worker completed.",
                               labels=["worker", "name", "card"])
    active = [w for w in workers if w.state == "active"]
    for w in active:
        labels = [w.worker_id, w.name, card(w.card).get("name", "unknown")]
        speed.add_metric(labels, w.tokens_per_s)
        done.add_metric(labels, w.tasks_done)
    yield speed
    yield done
    yield GaugeMetricFamily("nomoat_tokens_per_second", "Measured training speed of all active workers together.",
                            value=sum(w.tokens_per_s for w in active))


def _versions(ledger: Ledger) -> Iterator[Metric]:
    yield GaugeMetricFamily("nomoat_versions", "Versions of the running model published (version 0 included).",
                            value=ledger.versions.count())
    versions = status.versions(ledger, LOSS_LOOKBACK)
    latest = versions[-1] if versions else None
    yield GaugeMetricFamily("nomoat_version_latest", "The newest version's number.",
                            value=latest.version if latest else -1)
    loss = GaugeMetricFamily("nomoat_version_eval_loss", "Held-out loss of the newest version that has one.")
    measured = [v for v in versions if math.isfinite(v.eval_loss)]
    if measured:
        loss.add_metric([], measured[-1].eval_loss)
    yield loss


def _counters(ledger: Ledger) -> Iterator[Metric]:
    t = ledger.counters.tally()
    yield CounterMetricFamily("nomoat_leases", "Leases granted (first leases and re-issues).", value=t.leases)
    yield CounterMetricFamily("nomoat_task_reissues", "Leases of a task leased before (its lease expired, its run "
                              "failed or was stopped).", value=t.reissues)
    yield CounterMetricFamily("nomoat_leases_expired", "Leases that ran out without a heartbeat.",
                              value=t.leases_expired)
    yield CounterMetricFamily("nomoat_speculative_leases", "Second leases given to stragglers near a job's end.",
                              value=t.speculations)
    uploads = CounterMetricFamily("nomoat_uploads", "Adapter uploads, by answer.", labels=["outcome"])
    for outcome, n in t.uploads.items():
        uploads.add_metric([outcome], n)
    yield uploads
    yield CounterMetricFamily("nomoat_upload_bytes", "Bytes of adapters accepted (held ones included).",
                              value=t.upload_bytes)
    refusals = CounterMetricFamily("nomoat_refusals", "Uploads refused and adapters the fold gates rejected, by "
                                   "stage and reason.", labels=["stage", "reason"])
    for (stage, kind), n in sorted(t.refusals.items()):
        refusals.add_metric([stage, kind], n)
    yield refusals
    folds = CounterMetricFamily("nomoat_folds", "Folds, by outcome (published a version, or nothing passed).",
                                labels=["outcome"])
    for outcome, n in t.folds.items():
        folds.add_metric([outcome], n)
    yield folds
    moved = CounterMetricFamily("nomoat_gateway_bytes", "Bytes the gateways moved themselves (model files pulled, "
                                "shards, adapters received); 0 with an object store.", labels=["kind"])
    for kind, n in t.gateway_bytes.items():
        moved.add_metric([kind], n)
    yield moved
    h = t.fold_seconds
    duration = HistogramMetricFamily("nomoat_fold_duration_seconds", "Time one fold took: gates, evaluations, "
                                     "publishing.")
    duration.add_metric([], [("+Inf" if math.isinf(b) else repr(b), n) for b, n in h.cumulative()], h.total)
    yield duration


class ProcessMetrics:
    """What only this process sees: requests to its HTTP port, and its open live streams."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("nomoat_http_requests", "Requests to this coordinator's HTTP port (this process "
                                "since it started).", ["path", "code"], registry=registry)
        self.streams = Gauge("nomoat_http_streams", "Live dashboard streams open on this process.", registry=registry)


class Metrics:
    """The registry ``/metrics`` serves: the ledger's families and this process's."""

    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LedgerCollector(ledger, settings))
        self.process = ProcessMetrics(self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
