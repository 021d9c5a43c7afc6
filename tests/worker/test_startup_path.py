"""What a worker does before its first ``/health`` (worker spec §2.3), and what it leaves for later.

``worker_startup_s`` in ``benchmarks/remote.py`` is the time to the first ``/health``: modules and
programs that answering it does not need wait until the worker listens, and whatever was made
cheaper on that path (wire records, metrics, load readings, ``--version``) behaves as before.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from _server_support import worker_config
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

import soma.worker.app as worker_app
from soma.wire import messages as m
from soma.worker import config as worker_config_module
from soma.worker.app import BindError, WorkerServer
from soma.worker.detect import busy_seconds
from soma.worker.metrics import CONTENT_TYPE, WorkerMetrics

# Loaded after the bind (or by the first request that needs them), never to answer /health.
DEFERRED = (
    "numpy",
    "psutil",
    "prometheus_client",
    "soma.filter",
    "soma.worker.execute",
    "soma.worker.connection",
    "soma.wire.v2",
    "soma.wire.messages",
    "soma.isolation.pool",
)

_BUILD_APP = f"""
import sys
from soma.worker.cli import main
from soma.worker.app import WorkerServer
from soma.worker.config import WorkerConfig
from soma.worker.detect import detect_machine, effective
from soma.worker.server import build_app

build_app(WorkerConfig(worker_id="w", python=sys.executable, port=0), effective=effective(detect_machine()))
print([name for name in {DEFERRED!r} if name in sys.modules])
"""


def _run_python(code: str) -> Any:
    """What a fresh interpreter running ``code`` printed last, as a Python literal."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_making_the_worker_app_loads_no_module_that_health_does_not_need() -> None:
    assert _run_python(_BUILD_APP) == []


def test_the_soma_package_loads_filters_on_first_use() -> None:
    code = """
import sys
import soma
before = "soma.filter" in sys.modules or "soma.chain" in sys.modules
from soma import Chain, Filter, Fork
import soma.chain, soma.filter
print([before, Filter is soma.filter.Filter, Chain is soma.chain.Chain, Fork is soma.chain.Fork, callable(soma.search)])
"""
    assert _run_python(code) == [False, True, True, True, True]


# --------------------------------------------------------------------------- client TLS trust


def test_ca_certificates_deferred_during_a_block_are_loaded_later() -> None:
    code = """
import ssl
from soma.worker.trust import deferred_trust, load_deferred_trust

def cas(context):
    return context.cert_store_stats()["x509_ca"]

with deferred_trust():
    deferred = ssl.create_default_context()
after_block = ssl.create_default_context()
before = cas(deferred)
load_deferred_trust()
print([before, cas(deferred) == cas(after_block), "set_default_verify_paths" in vars(ssl.SSLContext)])
"""
    assert _run_python(code) == [0, True, False]


_CLI_TRUST = """
import os, signal, ssl, sys, threading
import soma.worker.cli as cli

def cas(context):
    return context.cert_store_stats()["x509_ca"]

seen = []
load = cli.load_deferred_trust

def load_and_stop():
    import aiohttp.connector
    seen.append(cas(aiohttp.connector._SSL_CONTEXT_VERIFIED))
    load()
    seen.append(cas(aiohttp.connector._SSL_CONTEXT_VERIFIED) == cas(ssl.create_default_context()))
    os.kill(os.getpid(), signal.SIGTERM)

cli.load_deferred_trust = load_and_stop
code = cli.main(["--port", "0", "--prewarm", "0", "--temp-dir", sys.argv[1], "--work-dir", sys.argv[2]])
print([code, *seen])
"""


def test_the_cli_worker_loads_clients_ca_certificates_once_it_listens(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CLI_TRUST, str(tmp_path / "temp"), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == [0, 0, True]


# --------------------------------------------------------------------------- interpreter probes


async def test_interpreter_probes_begin_once_the_worker_listens(
    tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []

    def probe(*, python: str) -> tuple[str, ...]:
        listening = False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", free_port), timeout=2):
            listening = True
        seen.append(listening)
        return ("Python 3.0.0 (/probed/python)",)

    monkeypatch.setattr(worker_app, "detect_python_envs", probe)
    server = WorkerServer(worker_config(tmp_path, port=free_port))
    try:
        await server.start()
        assert seen == [True]
        assert server.state is not None and server.state.effective.python_envs == ("Python 3.0.0 (/probed/python)",)
    finally:
        await server.stop()


async def test_a_worker_that_cannot_bind_runs_no_interpreter_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def probe(*, python: str) -> tuple[str, ...]:
        calls.append(python)
        return ()

    monkeypatch.setattr(worker_app, "detect_python_envs", probe)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = WorkerServer(worker_config(tmp_path, port=taken.getsockname()[1]))
        with pytest.raises(BindError, match="cannot bind"):
            await server.start()
    await asyncio.sleep(0.1)  # a probe started anyway would have run by now
    assert calls == []


# --------------------------------------------------------------------------- metrics


def test_metrics_are_made_once_whichever_thread_uses_them_first() -> None:
    metrics = WorkerMetrics(slots_total=2)
    start = threading.Barrier(8)

    def count() -> None:
        start.wait()
        metrics.bytes_sent.inc()

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.registry.get_sample_value("soma_worker_bytes_sent_total") == 8
    registry = metrics.registry
    metrics.prepare()
    assert metrics.registry is registry
    assert not hasattr(metrics, "bytes_lost")


def test_prepared_and_first_used_metrics_render_the_same_families() -> None:
    used = WorkerMetrics(slots_total=3)
    used.count_request("Ping", "ok")
    prepared = WorkerMetrics(slots_total=3)
    prepared.prepare()
    prepared.count_request("Ping", "ok")

    def lines(metrics: WorkerMetrics) -> list[str]:  # creation times differ, the rest does not
        return [line for line in metrics.render().decode().splitlines() if "_created" not in line]

    assert lines(used) == lines(prepared)
    assert 'soma_worker_requests_total{outcome="ok",type="Ping"} 1.0' in lines(used)


def test_every_instrument_made_is_one_the_metrics_declare_and_the_reverse() -> None:
    metrics = WorkerMetrics(slots_total=1)
    metrics.prepare()
    made = {name for name in vars(metrics) if not name.startswith("_")} - {"slots_total", "memory_limit_bytes"}
    assert made == set(WorkerMetrics.__annotations__)
    fresh = WorkerMetrics(slots_total=1)
    for name in WorkerMetrics.__annotations__:
        assert getattr(fresh, name) is not None  # each one makes them all on first use


def test_metrics_content_type_is_prometheus_text_0_0_4() -> None:
    assert CONTENT_TYPE == CONTENT_TYPE_PLAIN_0_0_4


# --------------------------------------------------------------------------- load readings


def _psutil_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times)) - sum(getattr(times, name, 0.0) for name in ("idle", "iowait", "guest", "guest_nice"))


@pytest.mark.parametrize("proc_stat", [Path("/proc/stat"), Path("/nonexistent/stat")], ids=["procfs", "psutil"])
def test_busy_seconds_are_psutils_busy_cpu_time(proc_stat: Path) -> None:
    before = _psutil_busy_seconds()
    reading = busy_seconds(proc_stat)
    after = _psutil_busy_seconds()
    assert before - 1e-6 <= reading <= after + 1e-6


# --------------------------------------------------------------------------- --version


def test_the_version_is_looked_up_only_for_version(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lookups: list[None] = []

    def version() -> str:
        lookups.append(None)
        return "9.8.7"

    monkeypatch.setattr(worker_config_module, "_version", version)
    worker_config_module.config_from_args(["--port", "9000", "--id", "w1"], {})
    assert lookups == []
    with pytest.raises(SystemExit) as info:
        worker_config_module.config_from_args(["--version"], {})
    assert info.value.code == 0 and lookups == [None]
    assert capsys.readouterr().out == "soma-worker 9.8.7\n"


# --------------------------------------------------------------------------- wire records


def _record_classes() -> list[type[m.Record]]:
    return [
        cls
        for cls in vars(m).values()
        if isinstance(cls, type) and issubclass(cls, m.Record) and dataclasses.is_dataclass(cls)
    ]


def _generated(cls: type[m.Record]) -> Any:
    """A dataclass with ``cls``'s fields and the ``repr``/``==``/hash the dataclass decorator generates."""
    options = [
        (f.name, Any, dataclasses.field(repr=f.repr, compare=f.compare, hash=f.hash))
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    ]
    return dataclasses.make_dataclass(cls.__name__, options, frozen=True)


def _values(cls: type[m.Record], **values: Any) -> dict[str, Any]:
    fields = {f.name: f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {**fields, **values}


@pytest.mark.parametrize("cls", _record_classes(), ids=lambda cls: cls.__name__)
def test_wire_records_compare_hash_and_print_as_dataclasses_do(cls: type[m.Record]) -> None:
    generated = _generated(cls)
    record, same, twin = cls(**_values(cls)), cls(**_values(cls)), generated(**_values(cls))
    first = dataclasses.fields(cls)[0].name  # type: ignore[arg-type]
    other = cls(**_values(cls, **{first: "another value"}))
    assert repr(record) == repr(twin) and repr(other) == repr(generated(**_values(cls, **{first: "another value"})))
    assert (record == same, record == other, record != other) == (True, False, True)
    assert generated.__eq__(record, same) and not generated.__eq__(record, other)
    unrelated = m.Pong if cls is m.Ping else m.Ping
    assert record != unrelated(**_values(unrelated)) and record != twin and record != "text"
    assert hash(record) == hash(same) == generated.__hash__(record)
    looped, looped_twin = cls(**_values(cls, **{first: []})), generated(**_values(cls, **{first: []}))
    getattr(looped, first).append(looped)
    getattr(looped_twin, first).append(looped_twin)
    assert repr(looped) == repr(looped_twin)
    with pytest.raises(TypeError):
        hash(looped)


def test_the_default_inline_threshold_is_the_wire_protocols() -> None:
    assert worker_config_module.INLINE_THRESHOLD == m.INLINE_THRESHOLD_BYTES
    assert worker_config_module.config_from_args([], {}).inline_threshold == m.INLINE_THRESHOLD_BYTES
