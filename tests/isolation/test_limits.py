"""Thread variables, CPU affinity, RSS readings and the memory watch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from soma.errors import SomaConfigError
from soma.isolation.limits import (
    THREAD_VARIABLES,
    MemoryWatch,
    affinity_for,
    apply_affinity,
    format_bytes,
    read_rss,
    thread_env,
)


def test_thread_env_divides_cores_among_concurrent_children() -> None:
    assert thread_env(16, 4, {}) == {name: "4" for name in THREAD_VARIABLES}
    assert thread_env(3, 8, {}) == {name: "1" for name in THREAD_VARIABLES}


def test_thread_env_keeps_variables_the_operator_set() -> None:
    env = thread_env(16, 2, {"OMP_NUM_THREADS": "3", "UNRELATED": "x"})
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["MKL_NUM_THREADS"] == "8"
    assert "UNRELATED" not in env


def test_thread_env_rejects_non_positive_counts() -> None:
    with pytest.raises(SomaConfigError, match="max_concurrent"):
        thread_env(4, 0, {})


def test_affinity_for_takes_the_first_cpus_of_the_own_set() -> None:
    assert affinity_for(2, {7, 3, 5, 9}) == frozenset({3, 5})
    assert affinity_for(4, {7, 3, 5, 9}) is None
    assert affinity_for(8, {0, 1}) is None
    with pytest.raises(SomaConfigError):
        affinity_for(0, {0, 1})


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only"
)
def test_apply_affinity_restricts_a_running_process() -> None:
    own = os.sched_getaffinity(0)
    cpus = affinity_for(1, own) or frozenset(own)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert apply_affinity(proc.pid, cpus)
        assert os.sched_getaffinity(proc.pid) == set(cpus)
    finally:
        proc.kill()
        proc.wait()
    assert not apply_affinity(proc.pid, cpus)
    assert not apply_affinity(os.getpid(), None)


def test_read_rss_of_this_process_and_of_a_missing_one() -> None:
    rss = read_rss(os.getpid())
    assert rss is not None and rss > 10 << 20
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert read_rss(proc.pid) is None


def test_format_bytes_reads_naturally() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 20) == "3.0 MiB"
    assert format_bytes(5 << 30) == "5.0 GiB"


@dataclass
class FakeChild:
    """Stands in for a Child: a pid whose RSS is read, and the kills it received."""

    pid: int
    kills: list[tuple[str, str, int | None]] = field(default_factory=list)

    def kill(self, reason: str, *, detail: str = "", rss: int | None = None) -> None:
        self.kills.append((reason, detail, rss))


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two idle processes of different sizes: the second holds about 200 MiB more."""
    small = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    big = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; b = bytearray(200 << 20); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert big.stdout is not None and big.stdout.readline() == b"ready\n"
    yield [small, big]
    for proc in (small, big):
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_memory_watch_kills_a_child_above_its_own_limit(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    small, big = (FakeChild(p.pid) for p in sleepers)
    watch = MemoryWatch(child_limit=150 << 20)
    watch.register(small)
    watch.register(big)
    watch.check()
    assert small.kills == []
    [(reason, detail, rss)] = big.kills
    assert reason == "memory_limit"
    assert rss is not None and rss > 150 << 20
    assert "above the child memory limit 150.0 MiB" in detail
    watch.check()
    assert len(big.kills) == 1, "a killed child is no longer watched"


def test_memory_watch_per_child_limit_tightens_the_default(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    small = FakeChild(sleepers[0].pid)
    watch = MemoryWatch(child_limit=1 << 40)
    watch.register(small, limit=1 << 20)
    watch.check()
    assert [k[0] for k in small.kills] == ["memory_limit"]


def test_memory_watch_total_limit_kills_the_largest(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    small, big = (FakeChild(p.pid) for p in sleepers)
    total = read_rss(small.pid) + read_rss(big.pid)  # type: ignore[operator]
    watch = MemoryWatch(total_limit=total - (50 << 20))
    watch.register(small)
    watch.register(big)
    watch.check()
    assert small.kills == []
    assert [k[0] for k in big.kills] == ["memory_limit"]
    assert "in total" in big.kills[0][1]


def test_memory_watch_thread_polls_until_stopped(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    big = FakeChild(sleepers[1].pid)
    watch = MemoryWatch(child_limit=100 << 20, interval=0.05)
    assert watch.start()
    try:
        watch.register(big)
        end = time.monotonic() + 5
        while not big.kills and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        watch.stop()
    assert big.kills and watch.kills == 1


def test_memory_watch_rejects_bad_limits() -> None:
    with pytest.raises(SomaConfigError):
        MemoryWatch(interval=0)
    with pytest.raises(SomaConfigError):
        MemoryWatch(total_limit=0)
    with pytest.raises(SomaConfigError):
        MemoryWatch().register(FakeChild(os.getpid()), limit=-1)
