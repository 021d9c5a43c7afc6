"""Server pieces without a network: token checks, log masking, handlers on mocked requests, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from _server_support import FIXED_CAPS, worker_config
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from soma.isolation.pool import PoolStats
from soma.worker.detect import effective
from soma.worker.metrics import KILL_REASONS, WorkerMetrics, kill_reason
from soma.worker.server import STATE, build_app, check_token, health, mask_token


def test_check_token_compares_whole_tokens_of_any_length() -> None:
    assert check_token("s3cret-token", "s3cret-token")
    assert not check_token("s3cret-toke", "s3cret-token")
    assert not check_token("s3cret-token-and-more", "s3cret-token")
    assert not check_token("", "s3cret-token")
    assert check_token("ünï cødé&#+", "ünï cødé&#+")


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("/ws?token=abc", "/ws?token=***"),
        ("/metrics?x=1&token=a%26b&y=2", "/metrics?x=1&token=***&y=2"),
        ("/download?ref=%7B%7D&TOKEN=zz", "/download?ref=%7B%7D&TOKEN=***"),
        ("/health", "/health"),
        ("/x?mytoken=keep", "/x?mytoken=keep"),
    ],
)
def test_mask_token_hides_query_tokens_only(raw: str, masked: str) -> None:
    assert mask_token(raw) == masked


async def test_health_handler_reports_draining(tmp_path: Path) -> None:
    config = worker_config(tmp_path)
    app = build_app(config, effective=effective(FIXED_CAPS))
    request = make_mocked_request("GET", "/health", app=app)
    response = await health(request)
    assert isinstance(response, web.Response)
    assert (response.status, response.text, response.content_type) == (200, "ok", "text/plain")
    app[STATE].request_shutdown(None, "test")
    response = await health(request)
    assert isinstance(response, web.Response)
    assert (response.status, response.text) == (503, "draining")


def test_shutdown_is_allowed_only_with_a_token_or_on_loopback(tmp_path: Path) -> None:
    caps = effective(FIXED_CAPS)

    def allowed(**overrides: object) -> bool:
        return build_app(worker_config(tmp_path, **overrides), effective=caps)[STATE].shutdown_allowed

    assert allowed(host="127.0.0.1")
    assert allowed(host="::1")
    assert allowed(host="0.0.0.0", token="t" * 20)
    assert not allowed(host="0.0.0.0", insecure=True)
    assert not allowed(host="10.1.2.3", insecure=True)


def test_memory_limit_is_the_flag_or_ninety_percent_of_ram(tmp_path: Path) -> None:
    caps = effective(FIXED_CAPS)
    assert build_app(worker_config(tmp_path), effective=caps)[STATE].memory_limit() == int(0.9 * (8 << 30))
    assert build_app(worker_config(tmp_path, memory=1 << 30), effective=caps)[STATE].memory_limit() == 1 << 30


@pytest.mark.parametrize(
    ("pool_reason", "label"),
    [
        ("timeout", "timeout"),
        ("cancelled", "cancel"),
        ("memory_limit", "memory"),
        ("child_crashed", "crash"),
        ("child_protocol_error", "crash"),
        ("idle_ttl", "retire"),
        ("max_tasks", "retire"),
        ("closed", "retire"),
    ],
)
def test_pool_kill_reasons_map_to_the_five_metric_labels(pool_reason: str, label: str) -> None:
    assert kill_reason(pool_reason) == label
    assert label in KILL_REASONS


class _Pool:
    def stats(self) -> PoolStats:
        return PoolStats(idle=2, busy=1, pinned=1, spawned=9, kills={"memory_limit": 2, "idle_ttl": 3, "cancelled": 1})


class _Store:
    deleted_total = 5

    def bytes_used(self) -> int:
        return 1234


def test_metrics_read_live_sources_at_scrape_time() -> None:
    metrics = WorkerMetrics(slots_total=4, memory_limit_bytes=1 << 30)
    status = {"free_slots": 1, "queue_depth": 3, "sessions": 2}
    metrics.attach(status=lambda: status, pool=_Pool(), store=_Store())
    text = metrics.render().decode()
    for line in (
        "soma_worker_slots_total 4.0",
        "soma_worker_slots_busy 3.0",
        "soma_worker_queue_depth 3.0",
        "soma_worker_sessions 2.0",
        'soma_worker_children{state="idle"} 2.0',
        'soma_worker_children{state="pinned"} 1.0',
        'soma_worker_child_kills_total{reason="memory"} 2.0',
        'soma_worker_child_kills_total{reason="retire"} 3.0',
        'soma_worker_child_kills_total{reason="cancel"} 1.0',
        'soma_worker_child_kills_total{reason="crash"} 0.0',
        "soma_worker_store_bytes 1234.0",
        "soma_worker_store_deleted_total 5.0",
        "soma_worker_memory_limit_bytes 1.073741824e+09",
    ):
        assert line in text, line
    status["free_slots"] = 4
    assert "soma_worker_slots_busy 0.0" in metrics.render().decode()
