"""Queue depth of a Celery queue on the Redis transport: every job waiting or in flight.

The length of the Redis list named after the queue misses most of it (kombu 5.x,
``kombu/transport/redis.py``):

- with priorities, kombu splits a queue into one list per priority step
  (``PRIORITY_STEPS = [0, 3, 6, 9]``): priority 0 goes to ``queue`` itself, the others to
  ``queue + "\\x06\\x16" + str(step)`` (``Channel.sep``, ``Channel._q_for_pri``);
- a message a worker has taken (reserved or running; with ``task_acks_late`` until the job
  ends) sits in the ``unacked`` hash (``Channel.unacked_key``), delivery tag ->
  JSON ``[message, exchange, routing_key]`` (``QoS.append``), and in no list;
- Redis deletes an empty list, so a missing key reads as 0.

``queue_depth`` adds them all up. An unacked message belongs to ``queue`` when its routing
key or its exchange is the queue's name: Celery declares each queue of ``task_routes``
with a direct exchange and routing key of the queue's own name (and the default exchange
routes by routing key = queue name). A transport ``global_keyprefix`` is not supported.

The exporter: ``python -m maskfleet.tasks.queue_depth --port 9809 --queues maskfleet.model.sd15``
(``--redis-url`` defaults to ``MASKFLEET_BROKER_URL``) serves ``maskfleet_queue_depth{queue}``
at ``/metrics``, read from Redis at each scrape; KEDA's prometheus trigger scales on it
(deploy/k8s/scaledobject.yaml). One exporter for the whole fleet is enough.
"""
from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..settings import load_settings

# kombu.transport.redis: PRIORITY_STEPS, Channel.sep, Channel.unacked_key
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
UNACKED_KEY = "unacked"
DEFAULT_PORT = 9809


def priority_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps `queue`'s messages in, one per priority step."""
    return [queue if pri == 0 else f"{queue}{PRIORITY_SEP}{pri}" for pri in PRIORITY_STEPS]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def unacked_count(redis_client: Any, queue: str) -> int:
    """Messages of `queue` delivered to a worker and not yet acknowledged."""
    count = 0
    for _tag, raw in redis_client.hscan_iter(UNACKED_KEY, count=500):
        try:
            _message, exchange, routing_key = json.loads(_text(raw))
        except (ValueError, TypeError):
            continue
        if queue in (routing_key, exchange):
            count += 1
    return count


def queue_depth(redis_client: Any, queue: str) -> int:
    """Jobs of `queue` waiting (all its priority lists) or in flight (the unacked hash)."""
    pipe = redis_client.pipeline(transaction=False)
    for key in priority_lists(queue):
        pipe.llen(key)  # a missing key (deleted empty list) is 0
    waiting = sum(int(n or 0) for n in pipe.execute())
    return waiting + unacked_count(redis_client, queue)


class QueueDepthCollector(Collector):
    """``maskfleet_queue_depth{queue}``, read from Redis when Prometheus scrapes."""

    def __init__(self, redis_url: str, queues: Iterable[str]):
        from .redis_urls import redis_client

        self.queues = list(queues)
        self.client = redis_client(redis_url)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("maskfleet_queue_depth", "Jobs of a queue waiting in Redis or in flight (unacked)",
                                  labels=["queue"])
        for queue in self.queues:
            depth.add_metric([queue], queue_depth(self.client, queue))
        yield depth


def serve_queue_depth(port: int, redis_url: str, queues: Iterable[str], addr: str = "0.0.0.0") -> CollectorRegistry:
    """Serve maskfleet_queue_depth for `queues` on `port` (a daemon thread); return its registry."""
    registry = CollectorRegistry()
    registry.register(QueueDepthCollector(redis_url, queues))
    start_http_server(port, addr=addr, registry=registry)
    return registry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m maskfleet.tasks.queue_depth",
                                     description="Prometheus exporter of Celery queue depth on Redis")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--addr", default="0.0.0.0")
    parser.add_argument("--redis-url", default=load_settings().broker_url)
    parser.add_argument("--queues", required=True, help="comma-separated queue names")
    args = parser.parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    serve_queue_depth(args.port, args.redis_url, queues, addr=args.addr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
