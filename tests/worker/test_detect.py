"""Capability detection and the capability summary (worker spec §3.1–§3.2), load readings (§5.2)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from soma.worker.detect import (
    Detected,
    GpuDevice,
    LoadMeter,
    detect,
    detect_cpus,
    detect_gpus,
    detect_pythons,
    detect_ram,
    effective,
    parse_nvidia_smi,
    summary,
    visible_gpus,
)

MIB = 2**20
GIB = 2**30
UUID_0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID_1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
CANNED_CSV = f"0, {UUID_0}, NVIDIA H200, 143771\n1, {UUID_1}, NVIDIA A100-SXM4-80GB , 81920\n"


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path) -> Path:
    """A stand-in ``nvidia-smi`` that checks its query and prints two GPUs."""
    args_file = tmp_path / "args"
    return _script(
        tmp_path / "nvidia-smi",
        f'echo "$@" > {args_file}\ncat <<"EOF"\n{CANNED_CSV}EOF\n',
    )


# --------------------------------------------------------------------------- GPUs


def test_nvidia_smi_gpus_are_parsed_with_memory_in_bytes(fake_nvidia_smi: Path) -> None:
    gpus = detect_gpus(nvidia_smi=str(fake_nvidia_smi), use_nvml=False, environ={})
    assert gpus == [
        GpuDevice(index=0, uuid=UUID_0, name="NVIDIA H200", memory_bytes=143771 * MIB),
        GpuDevice(index=1, uuid=UUID_1, name="NVIDIA A100-SXM4-80GB", memory_bytes=81920 * MIB),
    ]
    query = (fake_nvidia_smi.parent / "args").read_text().split()
    assert query == ["--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("1", [1]),
        ("1,0", [1, 0]),
        (f"{UUID_1},0", [1, 0]),
        ("GPU-aaaa", [1]),
        ("", []),
        ("0,7,1", [0]),
        ("-1", []),
        (" 0 , 0 ", [0]),
    ],
)
def test_cuda_visible_devices_filters_and_orders_gpus(fake_nvidia_smi: Path, visible: str, indices: list[int]) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": visible}
    gpus = detect_gpus(nvidia_smi=str(fake_nvidia_smi), use_nvml=False, environ=environ)
    assert [gpu.index for gpu in gpus] == indices


def test_missing_or_failing_nvidia_smi_means_no_gpus(tmp_path: Path) -> None:
    assert detect_gpus(nvidia_smi=str(tmp_path / "absent"), use_nvml=False, environ={}) == []
    failing = _script(tmp_path / "failing-smi", "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert detect_gpus(nvidia_smi=str(failing), use_nvml=False, environ={}) == []


def test_slow_nvidia_smi_is_abandoned_at_its_timeout(tmp_path: Path) -> None:
    slow = _script(tmp_path / "slow-smi", "exec sleep 30\n")
    started = time.monotonic()
    assert detect_gpus(nvidia_smi=str(slow), use_nvml=False, environ={}, timeout=0.5) == []
    assert time.monotonic() - started < 5


def test_unparsable_nvidia_smi_lines_are_skipped() -> None:
    text = f"garbage\n0, {UUID_0}, Tesla, [N/A]\n2, GPU-x, Name, With, Commas, 1024\n"
    assert parse_nvidia_smi(text) == [GpuDevice(index=2, uuid="GPU-x", name="Name, With, Commas", memory_bytes=GIB)]


def test_visible_gpus_without_the_variable_keeps_all() -> None:
    gpus = parse_nvidia_smi(CANNED_CSV)
    assert visible_gpus(gpus, None) == gpus


# --------------------------------------------------------------------------- CPUs and RAM


def _cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_cpu_quota_lowers_the_cpu_count(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/", {"cpu.max": "100000 100000\n"})
    assert detect_cpus(cgroup_root=root, proc_cgroup=proc) == 1


def test_fractional_quota_rounds_up_and_never_raises_the_count(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/", {"cpu.max": "150000 100000\n"})
    assert detect_cpus(cgroup_root=root, proc_cgroup=proc) == min(2, _affinity())
    root, proc = _cgroup(tmp_path / "big", "/", {"cpu.max": "6400000 100000\n"})
    assert detect_cpus(cgroup_root=root, proc_cgroup=proc) == _affinity()


def test_unlimited_or_missing_quota_keeps_the_affinity(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/", {"cpu.max": "max 100000\n"})
    assert detect_cpus(cgroup_root=root, proc_cgroup=proc) == _affinity()
    assert detect_cpus(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none") == _affinity()


def test_quota_on_a_parent_cgroup_applies(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "/a/b", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"})
    assert detect_cpus(cgroup_root=root, proc_cgroup=proc) == 1


def test_memory_limits_lower_the_ram(tmp_path: Path) -> None:
    physical = detect_ram(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none")
    assert physical > 256 * MIB
    root, proc = _cgroup(tmp_path, "/", {"memory.max": f"{128 * MIB}\n"})
    assert detect_ram(cgroup_root=root, proc_cgroup=proc) == 128 * MIB
    root, proc = _cgroup(tmp_path / "v1", "/", {"memory/memory.limit_in_bytes": f"{64 * MIB}\n"})
    assert detect_ram(cgroup_root=root, proc_cgroup=proc) == 64 * MIB


def test_unlimited_memory_keeps_the_physical_ram(tmp_path: Path) -> None:
    physical = detect_ram(cgroup_root=tmp_path / "none", proc_cgroup=tmp_path / "none")
    root, proc = _cgroup(tmp_path, "/", {"memory.max": "max\n", "memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert detect_ram(cgroup_root=root, proc_cgroup=proc) == physical


# --------------------------------------------------------------------------- Python interpreters


def test_configured_interpreter_comes_first_with_version_and_path(tmp_path: Path) -> None:
    envs = detect_pythons(sys.executable, search_path=str(tmp_path), conda=str(tmp_path / "no-conda"))
    version = ".".join(map(str, sys.version_info[:3]))
    assert len(envs) == 1
    assert envs[0].startswith(f"Python {version} (") and envs[0].endswith(")")


def test_path_interpreters_and_conda_envs_are_listed_without_duplicates(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = _script(bin_dir / "python3", "echo 'Python 3.9.1' >&2\n")  # old Pythons print to stderr
    (bin_dir / "python").symlink_to(python3)  # the same interpreter under another name
    conda = _script(
        tmp_path / "conda",
        "echo '" + json.dumps({"envs": ["/opt/conda", "/opt/conda/envs/torch"]}) + "'\n",
    )
    envs = detect_pythons(str(python3), search_path=str(bin_dir), conda=str(conda))
    assert envs == [f"Python 3.9.1 ({python3})", "conda:base", "conda:torch"]


def test_interpreters_that_hang_or_fail_are_left_out(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "python3", "exec sleep 30\n")
    _script(bin_dir / "python", "echo 'not a python'\n")
    started = time.monotonic()
    envs = detect_pythons(sys.executable, search_path=str(bin_dir), conda="no-such-conda", version_timeout=0.5)
    assert len(envs) == 1 and envs[0].startswith("Python ")
    assert time.monotonic() - started < 5


def test_detect_runs_every_probe(fake_nvidia_smi: Path, tmp_path: Path) -> None:
    detected = detect(
        nvidia_smi=str(fake_nvidia_smi),
        use_nvml=False,
        environ={"CUDA_VISIBLE_DEVICES": "1"},
        search_path=str(tmp_path / "empty"),
        conda="no-such-conda",
    )
    assert detected.cpu_cores == detect_cpus() and detected.ram_bytes == detect_ram()
    assert [gpu.uuid for gpu in detected.gpus] == [UUID_1]
    assert len(detected.python_envs) == 1 and detected.python_envs[0].startswith("Python 3.")


def test_detect_is_bounded_by_its_deadline(tmp_path: Path) -> None:
    slow = _script(tmp_path / "slow-smi", "exec sleep 1.5\n")
    started = time.monotonic()
    detected = detect(nvidia_smi=str(slow), use_nvml=False, environ={}, search_path="", deadline=0.3)
    assert time.monotonic() - started < 1.2
    assert detected.gpus == () and detected.cpu_cores >= 1
    time.sleep(1.5)  # let the abandoned probe's child finish before the leak check


# --------------------------------------------------------------------------- effective values and summary


def _detected() -> Detected:
    return Detected(
        cpu_cores=8,
        ram_bytes=16 * GIB,
        gpus=tuple(parse_nvidia_smi(CANNED_CSV)),
        python_envs=("Python 3.11.7 (/usr/bin/python3.11)",),
    )


def test_summary_has_the_exact_format() -> None:
    caps = effective(_detected(), tags=["x"])
    assert caps.summary() == (
        "8 CPUs, 16.0 GB RAM, GPUs: NVIDIA H200 (140.4 GB), NVIDIA A100-SXM4-80GB (80.0 GB), "
        'Python: ["Python 3.11.7 (/usr/bin/python3.11)"], tags: ["gpu", "cpu", "x"]'
    )


def test_summary_without_gpus_says_none() -> None:
    caps = effective(_detected(), cpus=2, memory=3 * GIB // 2, gpus=0)
    assert summary(caps.capabilities()) == (
        '2 CPUs, 1.5 GB RAM, GPUs: none, Python: ["Python 3.11.7 (/usr/bin/python3.11)"], tags: ["cpu"]'
    )


def test_capabilities_have_exactly_the_wire_keys() -> None:
    caps = effective(_detected(), gpus=1)
    document = caps.capabilities()
    assert set(document) == {"cpu_cores", "ram_bytes", "gpus", "python_envs", "tags"}
    assert document["gpus"] == [{"name": "NVIDIA H200", "memory_bytes": 143771 * MIB}]
    assert caps.gpu_devices() == [{"index": 0, "uuid": UUID_0, "name": "NVIDIA H200", "memory_bytes": 143771 * MIB}]
    json.dumps(document)  # JSON-ready


def test_caps_only_lower_detected_values() -> None:
    detected = _detected()
    assert effective(detected, cpus=2).cpu_cores == 2
    assert effective(detected, cpus=64).cpu_cores == 8
    assert effective(detected, memory=GIB).ram_bytes == GIB
    assert effective(detected, memory=64 * GIB).ram_bytes == 16 * GIB
    assert [gpu.index for gpu in effective(detected, gpus=5).gpus] == [0, 1]
    assert effective(detected, gpus=0).tags == ("cpu",)


# --------------------------------------------------------------------------- load


def test_load_metrics_are_real_fractions_with_an_rfc3339_timestamp() -> None:
    meter = LoadMeter(cpu_cores=1, ram_bytes=detect_ram())
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # keep one CPU busy so the reading is not zero
        pass
    load = meter.load_metrics(active_plans=1, queue_depth=2, free_slots=3, max_concurrent=4, sessions=5)
    assert set(load) == {
        "cpu_usage",
        "memory_usage",
        "gpu_usage",
        "active_plans",
        "queue_depth",
        "timestamp",
        "free_slots",
        "max_concurrent",
        "sessions",
    }
    assert 0.0 < load["cpu_usage"] <= 1.0
    assert 0.0 < load["memory_usage"] < 1.0
    assert load["gpu_usage"] == []
    assert (load["active_plans"], load["queue_depth"], load["free_slots"], load["sessions"]) == (1, 2, 3, 5)
    stamp = datetime.fromisoformat(load["timestamp"])
    assert load["timestamp"].endswith("Z") and abs(time.time() - stamp.timestamp()) < 5
