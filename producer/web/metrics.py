"""`GET /metrics`: Prometheus series read from Redis and MongoDB when scraped (`producer.fleet`).

One collector, registered in a registry of its own per app; every series is computed at scrape time, so
any number of API processes (and the Modal web endpoint) answer alike. README, "Operating it", lists the
series; `config/alerts.yml` alerts on them.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from config.settings import Settings
from producer import fleet
from producer.jobs import JobRecords

# The batch histograms cover the ledger entries that finished this long ago at most.
HISTOGRAM_WINDOW_SECONDS = 900
# Seconds: a batch's compute is seconds on a GPU; its wall time adds queue and store waits.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class FleetCollector(Collector):
    """Reads the fleet (`producer.fleet`) at each scrape and turns it into metric families."""

    def __init__(self, settings: Settings, records: JobRecords) -> None:
        self.settings = settings
        self.records = records
        self._indexed = False

    def collect(self) -> Iterator[Metric]:
        began = time.perf_counter()
        redis, db = self.records.redis, self.records.db
        if not self._indexed:
            fleet.ensure_indexes(db)
            self._indexed = True
        now = datetime.now(UTC)

        batches = GaugeMetricFamily("podembed_queue_batches", "Batches on a queue (queued) or in its rq registries",
                                    labels=["queue", "state"])
        oldest = GaugeMetricFamily("podembed_queue_oldest_age_seconds",
                                   "Seconds the batch at the queue's head has waited (0: empty)", labels=["queue"])
        for q in fleet.read_queues(self.settings, redis, now):
            for state, n in q.batches.items():
                batches.add_metric([q.queue, state], n)
            oldest.add_metric([q.queue], q.oldest_age_seconds or 0.0)
        yield batches
        yield oldest

        jobs = GaugeMetricFamily("podembed_jobs", "Jobs by state", labels=["state"])
        for state, n in sorted(fleet.count_jobs(self.records).items()):
            jobs.add_metric([state], n)
        yield jobs

        yield from _totals(fleet.read_totals(redis))
        yield from _workers(fleet.read_workers(self.settings, redis, db, now))

        recent = fleet.recent_batches(db, now - timedelta(seconds=HISTOGRAM_WINDOW_SECONDS),
                                      ("gpu_seconds", "wall_seconds"))
        for field, name, help_ in (
                ("gpu_seconds", "podembed_batch_compute_seconds", "Compute seconds of the batches of the last 15 min"),
                ("wall_seconds", "podembed_batch_wall_seconds", "Wall seconds of the batches of the last 15 min")):
            yield _histogram(name, help_, [e.get(field, 0.0) for e in recent])

        yield GaugeMetricFamily("podembed_scrape_seconds", "Seconds this scrape took to read Redis and MongoDB",
                                value=time.perf_counter() - began)


def metrics_registry(settings: Settings, records: JobRecords) -> CollectorRegistry:
    """A registry holding only the fleet's collector (no process metrics: they would describe one API process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(settings, records))
    return registry


def _totals(totals: list[fleet.Total]) -> Iterator[Metric]:
    by_model: dict[str, dict[str, float]] = defaultdict(Counter)
    for t in totals:
        for name in ("embedded", "skipped", "tokens"):
            by_model[t.model][name] += t.values[name]
    for name, key, help_ in (("podembed_chunks_embedded", "embedded", "Chunks the model embedded"),
                             ("podembed_chunks_skipped", "skipped", "Chunks whose vector was stored already"),
                             ("podembed_tokens", "tokens", "Tokens the model embedded, instruction included")):
        family = CounterMetricFamily(name, help_, labels=["model"])
        for model, values in sorted(by_model.items()):
            family.add_metric([model], values[key])
        yield family
    for name, key, help_ in (("podembed_batches", "batches", "Batches counted done"),
                             ("podembed_gpu_seconds", "gpu_seconds", "Busy compute seconds (the ledger's gpu_seconds)"),
                             ("podembed_cost_usd", "cost_usd", "USD of the busy seconds at the device's price")):
        family = CounterMetricFamily(name, help_, labels=["device", "model"])
        for t in totals:
            family.add_metric([t.device, t.model], t.values[key])
        yield family


def _workers(workers: fleet.Workers) -> Iterator[Metric]:
    count = GaugeMetricFamily("podembed_workers", "Live workers by device ('unknown': a local worker)",
                              labels=["device"])
    busy = GaugeMetricFamily("podembed_worker_busy_seconds", "Busy seconds of the live containers", labels=["device"])
    billed = GaugeMetricFamily("podembed_worker_billed_seconds", "Billed seconds of the live containers",
                               labels=["device"])
    per_device: dict[str, list[fleet.WorkerState]] = defaultdict(list)
    for w in workers.live:
        per_device[w.device].append(w)
    for device, group in sorted(per_device.items()):
        count.add_metric([device], len(group))
        busy.add_metric([device], sum(w.busy_seconds or 0.0 for w in group))
        billed.add_metric([device], sum(w.billed_seconds or 0.0 for w in group))
    yield count
    yield busy
    yield billed
    yield GaugeMetricFamily("podembed_workers_lost", "Containers that stopped beating without recording an exit",
                            value=workers.lost)


def _histogram(name: str, help_: str, values: list[float]) -> HistogramMetricFamily:
    cumulative = [(str(bound), sum(1 for v in values if v <= bound)) for bound in BUCKETS]
    return HistogramMetricFamily(name, help_, buckets=[*cumulative, ("+Inf", len(values))], sum_value=sum(values))
