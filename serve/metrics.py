"""Prometheus metrics for one app: HTTP outcomes, latency, and the engine's live state read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from flaxchat.sampling.engine import Engine


class EngineCollector:
    """Reads the engine's counters and gauges when Prometheus scrapes (nothing to keep in sync)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats
        yield CounterMetricFamily("flaxchat_generated_tokens", "Tokens generated", value=stats["tokens"])
        yield CounterMetricFamily("flaxchat_engine_requests", "Requests admitted to slots", value=stats["requests"])
        yield CounterMetricFamily("flaxchat_decode_calls", "Jitted decode calls", value=stats["decode_calls"])
        yield CounterMetricFamily("flaxchat_guided_choices", "Choices with a grammar or a thinking plan",
                                  value=stats["guided_choices"])
        yield CounterMetricFamily("flaxchat_closed_by_budget", "Constrained replies whose end was forced to fit "
                                  "max_tokens", value=stats["closed_by_budget"])
        yield CounterMetricFamily("flaxchat_content_filtered_replies", "Choices ended before blocked text",
                                  value=stats["content_filtered"])
        yield CounterMetricFamily("flaxchat_mask_seconds", "Host time computing next-token masks",
                                  value=stats["mask_ns"] / 1e9)
        yield CounterMetricFamily("flaxchat_prompt_tokens", "Prompt tokens of admitted requests",
                                  value=stats["prompt_tokens"])
        yield CounterMetricFamily("flaxchat_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache "
                                  "instead of being prefilled", value=stats["prefix_hit_tokens"])
        yield CounterMetricFamily("flaxchat_prefix_cache_reply_blocks", "Blocks of finished replies put in the "
                                  "prefix cache (where decoding writes what prefill would)",
                                  value=stats["reply_blocks_cached"])
        yield CounterMetricFamily("flaxchat_prefix_cache_evictions", "Prompt blocks evicted from the prefix cache",
                                  value=self.engine.prefix.evictions)
        yield GaugeMetricFamily("flaxchat_prefix_cache_bytes", "Device bytes of cached prompt blocks",
                                value=self.engine.prefix_cache_bytes)
        yield GaugeMetricFamily("flaxchat_prefix_cache_capacity_bytes", "Device bytes reserved for the prefix cache",
                                value=self.engine.prefix.capacity * self.engine.steps.block_bytes)
        yield GaugeMetricFamily("flaxchat_busy_slots", "Slots holding a sequence", value=self.engine.busy_slots)
        yield GaugeMetricFamily("flaxchat_slots", "Slots in the engine", value=self.engine.config.slots)
        yield GaugeMetricFamily("flaxchat_queue_depth", "Requests waiting for a slot", value=self.engine.queue_depth)
        yield GaugeMetricFamily("flaxchat_compiles", "Jitted steps compiled (constant after warm-up)",
                                value=self.engine.compile_count)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("flaxchat_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.filtered_prompts = Counter("flaxchat_content_filtered_prompts", "Prompts refused by the content filter",
                                        registry=self.registry)
        self.latency = Histogram("flaxchat_request_seconds", "Time to the full non-streamed reply",
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
