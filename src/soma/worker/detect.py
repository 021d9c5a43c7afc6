"""What this machine offers (worker spec §3.1–§3.2) and how busy it is (``LoadMetrics``, §5.2).

    detect(python=...)                    -> Detected    once at startup; probes in parallel, <= 15 s
    detect_machine() / detect_python_envs()              the same probes in two halves (the worker
                                                         binds between them: interpreters are slow)
    effective(detected, cpus=, memory=,
              gpus=, tags=)               -> Effective   the flags' caps applied
    Effective.capabilities()              -> the wire ``Capabilities`` dict, exactly its five keys
    summary(capabilities)                 -> the one-line summary of ``Worker.info()`` and the startup log
    LoadMeter(...).load_metrics(...)      -> the ``LoadMetrics`` dict of heartbeats and status replies

Every probe has a fallback and a time limit, so detection never fails and never hangs.
psutil is imported where a reading needs it, not at import: the worker binds without it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from soma.log import worker_logger
from soma.worker.config import parse_tags

__all__ = [
    "DETECTION_DEADLINE_S",
    "Detected",
    "Effective",
    "GpuDevice",
    "LoadMeter",
    "busy_seconds",
    "detect",
    "detect_cpus",
    "detect_gpus",
    "detect_machine",
    "detect_python_envs",
    "detect_pythons",
    "detect_ram",
    "effective",
    "parse_nvidia_smi",
    "summary",
    "visible_gpus",
]

DETECTION_DEADLINE_S = 15.0
GIB = 1024**3
MIB = 1024**2
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
NVIDIA_SMI_QUERY = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")
PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class GpuDevice:
    """One NVIDIA GPU as detected: ``index`` (physical), ``uuid``, ``name`` and total memory in bytes."""

    index: int
    uuid: str
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class Detected:
    """Raw detection results, before ``--cpus``/``--memory``/``--gpus`` caps."""

    cpu_cores: int
    ram_bytes: int
    gpus: tuple[GpuDevice, ...] = ()
    python_envs: tuple[str, ...] = ()


# --------------------------------------------------------------------------- cgroups


def _cgroup_v2_dirs(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 directory and its ancestors up to the root (limits nest)."""
    relative = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().lstrip("/")
    except OSError:
        pass
    here = cgroup_root / relative if relative else cgroup_root
    dirs = [here, *(parent for parent in here.parents if parent.is_relative_to(cgroup_root))]
    return list(dict.fromkeys(dirs))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_quota(text: str) -> int | None:
    """Whole CPUs allowed by a cgroup v2 ``cpu.max`` line (``"<quota> <period>"`` or ``"max ..."``)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    # Rounded up as loky does: a 1.5-CPU quota still runs two threads usefully.
    return max(1, math.ceil(quota / period))


def detect_cpus(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: its affinity (else ``os.cpu_count()``), lowered by a cgroup v2 ``cpu.max``."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        count = os.cpu_count() or 1
    for directory in _cgroup_v2_dirs(cgroup_root, proc_cgroup):
        text = _read(directory / "cpu.max")
        quota = _cpu_quota(text) if text else None
        if quota is not None:
            count = min(count, quota)
    return max(1, count)


def _physical_ram() -> int:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5, check=True
            )
            return int(out.stdout.strip())
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page_size > 0:
            return int(pages * page_size)
    except (ValueError, OSError, AttributeError):
        pass
    return _psutil_ram()


def _psutil_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def detect_ram(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Physical RAM in bytes, lowered by cgroup ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1)."""
    ram = _physical_ram()
    limits = [directory / "memory.max" for directory in _cgroup_v2_dirs(cgroup_root, proc_cgroup)]
    limits.append(cgroup_root / "memory" / "memory.limit_in_bytes")
    for path in limits:
        text = _read(path)
        if text and text.isdigit() and int(text) > 0:
            ram = min(ram, int(text))
    return ram


# --------------------------------------------------------------------------- GPUs


def parse_nvidia_smi(text: str) -> list[GpuDevice]:
    """Parse ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits``.

    Memory is reported in MiB. Lines that do not parse are skipped (DEBUG log).
    """
    gpus = []
    for line in text.splitlines():
        head = line.split(",", 2)
        if len(head) < 3 or "," not in head[2]:
            continue
        name, _, memory = head[2].rpartition(",")
        try:
            index, memory_mib = int(head[0]), int(float(memory))
        except ValueError:
            worker_logger.debug("nvidia-smi: skipping unparsable line %r", line)
            continue
        gpus.append(GpuDevice(index=index, uuid=head[1].strip(), name=name.strip(), memory_bytes=memory_mib * MIB))
    return gpus


def visible_gpus(gpus: Sequence[GpuDevice], cuda_visible_devices: str | None) -> list[GpuDevice]:
    """Keep the GPUs listed in ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, possibly prefixes), in its order.

    ``None`` keeps all; as in CUDA, the list ends at the first entry that matches no GPU.
    """
    if cuda_visible_devices is None:
        return list(gpus)
    kept: list[GpuDevice] = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        if entry.isdigit():
            match = [gpu for gpu in gpus if gpu.index == int(entry)]
        else:
            match = [gpu for gpu in gpus if entry and gpu.uuid.startswith(entry)]
        if len(match) != 1:
            break
        if match[0] not in kept:
            kept.append(match[0])
    return kept


def _nvml_gpus() -> list[GpuDevice] | None:
    """GPUs through NVML, or ``None`` when ``pynvml`` is missing or NVML does not start."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        worker_logger.debug("NVML unavailable: %s", exc)
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid, name = pynvml.nvmlDeviceGetUUID(handle), pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                GpuDevice(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name=(name.decode() if isinstance(name, bytes) else str(name)).strip(),
                    memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
        return gpus
    except pynvml.NVMLError as exc:
        worker_logger.debug("NVML query failed: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi_gpus(command: str, timeout: float) -> list[GpuDevice]:
    try:
        result = subprocess.run(
            [command, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        worker_logger.debug("no GPUs: %s not usable (%s)", command, exc)
        return []
    if result.returncode != 0:
        worker_logger.debug("no GPUs: %s exited %s: %s", command, result.returncode, result.stderr.strip())
        return []
    return parse_nvidia_smi(result.stdout)


def detect_gpus(
    *,
    nvidia_smi: str = "nvidia-smi",
    use_nvml: bool = True,
    environ: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> list[GpuDevice]:
    """NVIDIA GPUs via NVML when importable, else ``nvidia-smi`` (``timeout`` s), filtered by the
    worker's own ``CUDA_VISIBLE_DEVICES``. Neither available -> ``[]`` (DEBUG log).

    ``nvidia_smi`` is the command to run (tests point it at a script printing canned CSV).
    """
    env = os.environ if environ is None else environ
    gpus = _nvml_gpus() if use_nvml else None
    if gpus is None:
        gpus = _nvidia_smi_gpus(nvidia_smi, timeout)
    return visible_gpus(gpus, env.get("CUDA_VISIBLE_DEVICES"))


# --------------------------------------------------------------------------- Python interpreters


def _interpreter_key(executable: str) -> str:
    """The path that identifies an interpreter: resolved, except inside a venv (whose symlink
    points at the base interpreter but whose site-packages differ)."""
    path = Path(os.path.abspath(executable))
    if (path.parent.parent / "pyvenv.cfg").exists():
        return str(path)
    return os.path.realpath(path)


def _python_version(executable: str, timeout: float) -> str | None:
    """``"Python X.Y.Z"`` from ``<executable> --version`` (stdout or stderr), else ``None``."""
    try:
        result = subprocess.run(
            [executable, "--version"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        worker_logger.debug("python probe %s failed: %s", executable, exc)
        return None
    text = (result.stdout.strip() or result.stderr.strip()).splitlines()
    if result.returncode != 0 or not text or not text[0].startswith("Python "):
        return None
    return text[0].strip()


def _conda_envs(conda: str, timeout: float) -> list[tuple[str, str]]:
    """``(name, prefix)`` of each conda environment, from ``conda env list --json``."""
    executable = shutil.which(conda)
    if executable is None:
        return []
    try:
        result = subprocess.run(
            [executable, "env", "list", "--json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        prefixes = json.loads(result.stdout)["envs"] if result.returncode == 0 else []
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        worker_logger.debug("conda probe failed: %s", exc)
        return []
    envs = []
    for prefix in prefixes:
        path = Path(str(prefix))
        envs.append((path.name if path.parent.name == "envs" else "base", str(path)))
    return envs


def _candidate_interpreters(configured: str, search_path: str | None) -> list[str]:
    candidates = [configured]
    for name in ("python3", "python"):
        found = shutil.which(name, path=search_path)
        if found:
            candidates.append(found)
    return candidates


def _merge_pythons(
    candidates: Sequence[str], versions: Sequence[str | None], conda_envs: Iterable[tuple[str, str]]
) -> list[str]:
    entries: dict[str, str] = {}
    for executable, version in zip(candidates, versions, strict=True):
        key = _interpreter_key(executable)
        if version is not None and key not in entries:
            entries[key] = f"{version} ({key})"
    for name, prefix in conda_envs:
        key = _interpreter_key(str(Path(prefix) / "bin" / "python"))
        entries.setdefault(key, f"conda:{name}")
    return list(entries.values())


def detect_pythons(
    configured: str,
    *,
    search_path: str | None = None,
    conda: str = "conda",
    version_timeout: float = 5.0,
    conda_timeout: float = 10.0,
) -> list[str]:
    """Interpreters on offer: the configured one, ``python3`` and ``python`` on ``PATH``, then conda
    environments as ``conda:<name>``; duplicates by path removed.

    Entries read ``"Python 3.11.7 (/usr/bin/python3.11)"``. Interpreters that do not answer
    ``--version`` within ``version_timeout`` are left out.
    """
    candidates = _candidate_interpreters(configured, search_path)
    versions = [_python_version(executable, version_timeout) for executable in candidates]
    return _merge_pythons(candidates, versions, _conda_envs(conda, conda_timeout))


# --------------------------------------------------------------------------- all probes


def detect(
    *,
    python: str = sys.executable,
    nvidia_smi: str = "nvidia-smi",
    use_nvml: bool = True,
    environ: Mapping[str, str] | None = None,
    search_path: str | None = None,
    conda: str = "conda",
    deadline: float = DETECTION_DEADLINE_S,
) -> Detected:
    """Run every probe of §3.1 in parallel, bounded by ``deadline`` seconds.

    A probe still running at the deadline contributes its fallback (``os.cpu_count()``,
    psutil's total RAM, no GPUs, no interpreter entry) and a WARNING is logged. Blocking:
    call it from a thread (``asyncio.to_thread``) inside an event loop.
    """
    return _probe(
        machine=True,
        python=python,
        nvidia_smi=nvidia_smi,
        use_nvml=use_nvml,
        environ=environ,
        search_path=search_path,
        conda=conda,
        deadline=deadline,
    )


def detect_machine(
    *,
    nvidia_smi: str = "nvidia-smi",
    use_nvml: bool = True,
    environ: Mapping[str, str] | None = None,
    deadline: float = DETECTION_DEADLINE_S,
) -> Detected:
    """The CPU, RAM and GPU probes of ``detect`` alone (``python_envs`` left empty)."""
    return _probe(
        machine=True, python=None, nvidia_smi=nvidia_smi, use_nvml=use_nvml, environ=environ, deadline=deadline
    )


def detect_python_envs(
    *,
    python: str = sys.executable,
    search_path: str | None = None,
    conda: str = "conda",
    deadline: float = DETECTION_DEADLINE_S,
) -> tuple[str, ...]:
    """The interpreter probes of ``detect`` alone: the slow ones, each runs a program."""
    return _probe(machine=False, python=python, search_path=search_path, conda=conda, deadline=deadline).python_envs


def _probe(
    *,
    machine: bool,
    python: str | None,
    nvidia_smi: str = "nvidia-smi",
    use_nvml: bool = True,
    environ: Mapping[str, str] | None = None,
    search_path: str | None = None,
    conda: str = "conda",
    deadline: float,
) -> Detected:
    """Run the machine probes (if ``machine``) and the interpreter probes (if ``python``) in parallel."""
    candidates = _candidate_interpreters(python, search_path) if python is not None else []
    pool = ThreadPoolExecutor(max_workers=4 + len(candidates), thread_name_prefix="soma-detect")
    try:
        cpus = pool.submit(detect_cpus) if machine else None
        ram = pool.submit(detect_ram) if machine else None
        gpus = pool.submit(detect_gpus, nvidia_smi=nvidia_smi, use_nvml=use_nvml, environ=environ) if machine else None
        versions = [pool.submit(_python_version, executable, 5.0) for executable in candidates]
        conda_envs = pool.submit(_conda_envs, conda, 10.0) if python is not None else None
        all_futures: list[Future[Any]] = [f for f in (cpus, ram, gpus, conda_envs) if f is not None] + versions
        _, pending = wait_futures(all_futures, timeout=deadline)
        if pending:
            worker_logger.warning("capability detection: %d probe(s) exceeded %.0f s", len(pending), deadline)

        def result(future: Future[Any] | None, fallback: Callable[[], Any]) -> Any:
            return future.result() if future is not None and future.done() else fallback()

        return Detected(
            cpu_cores=result(cpus, lambda: os.cpu_count() or 1),
            ram_bytes=result(ram, _psutil_ram),
            gpus=tuple(result(gpus, list)),
            python_envs=tuple(
                _merge_pythons(
                    candidates,
                    [result(future, lambda: None) for future in versions],
                    result(conda_envs, list),
                )
            ),
        )
    finally:
        # Late probes end on their own subprocess timeouts; nothing waits for them here.
        pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- effective values


@dataclass(frozen=True)
class Effective:
    """Capabilities after the operator's caps (§3.2): what the worker offers and enforces."""

    cpu_cores: int
    ram_bytes: int
    gpus: tuple[GpuDevice, ...]
    python_envs: tuple[str, ...]
    tags: tuple[str, ...]

    def capabilities(self) -> dict[str, Any]:
        """The wire ``Capabilities``: exactly ``cpu_cores, ram_bytes, gpus, python_envs, tags``."""
        return {
            "cpu_cores": self.cpu_cores,
            "ram_bytes": self.ram_bytes,
            "gpus": [{"name": gpu.name, "memory_bytes": gpu.memory_bytes} for gpu in self.gpus],
            "python_envs": list(self.python_envs),
            "tags": list(self.tags),
        }

    def gpu_devices(self) -> list[dict[str, Any]]:
        """The allowed GPUs with ``index`` and ``uuid`` too (``/info.gpu_devices``)."""
        return [
            {"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "memory_bytes": gpu.memory_bytes}
            for gpu in self.gpus
        ]

    def summary(self) -> str:
        """The one-line summary (see ``summary``)."""
        return summary(self.capabilities())


def effective(
    detected: Detected,
    *,
    cpus: int | None = None,
    memory: int | None = None,
    gpus: int | None = None,
    tags: Iterable[str] | str | None = None,
) -> Effective:
    """Apply ``--cpus``, ``--memory`` (each a cap: min with detection), ``--gpus`` (the first N)
    and the extra tags (after ``gpu`` when a GPU is allowed, then ``cpu``)."""
    allowed = detected.gpus if gpus is None else detected.gpus[:gpus]
    return Effective(
        cpu_cores=detected.cpu_cores if cpus is None else min(detected.cpu_cores, cpus),
        ram_bytes=detected.ram_bytes if memory is None else min(detected.ram_bytes, memory),
        gpus=tuple(allowed),
        python_envs=detected.python_envs,
        tags=tuple(parse_tags(tags, has_gpu=bool(allowed))),
    )


def summary(capabilities: Mapping[str, Any]) -> str:
    """``"<n> CPUs, <x.x> GB RAM, GPUs: <name (y.y GB), …|none>, Python: [...], tags: [...]"``.

    GB = 2**30 with one decimal; the lists are JSON-style.
    """
    gpus = ", ".join(f"{gpu['name']} ({gpu['memory_bytes'] / GIB:.1f} GB)" for gpu in capabilities["gpus"])
    return (
        f"{capabilities['cpu_cores']} CPUs, {capabilities['ram_bytes'] / GIB:.1f} GB RAM, "
        f"GPUs: {gpus or 'none'}, "
        f"Python: {json.dumps(list(capabilities['python_envs']), ensure_ascii=False)}, "
        f"tags: {json.dumps(list(capabilities['tags']), ensure_ascii=False)}"
    )


# --------------------------------------------------------------------------- load


# Linux counts guest time inside user/nice as well; it is subtracted to avoid counting it twice.
_NOT_BUSY = ("idle", "iowait", "guest", "guest_nice")
# The "cpu" line of /proc/stat: clock ticks in this order (the last ones only on newer kernels).
_PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


def busy_seconds(proc_stat: Path = PROC_STAT) -> float:
    """System-wide busy CPU seconds since boot: all CPU time but idle, iowait and guest time.

    Read from ``/proc/stat``, which is what psutil reads on Linux, so that a ``LoadMeter``
    made at startup does not import psutil; psutil where procfs is missing (macOS).
    """
    try:
        with proc_stat.open("rb") as stat:
            ticks = [int(value) for value in stat.readline().split()[1 : len(_PROC_STAT_FIELDS) + 1]]
        per_second = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        ticks, per_second = [], 0
    if not ticks or per_second <= 0:
        import psutil

        times = psutil.cpu_times()
        return float(sum(times)) - sum(getattr(times, name, 0.0) for name in _NOT_BUSY)
    busy = sum(count for name, count in zip(_PROC_STAT_FIELDS, ticks, strict=False) if name not in _NOT_BUSY)
    return busy / per_second


@dataclass
class LoadMeter:
    """Real load readings for ``LoadMetrics`` (§5.2, coordinator spec §3.2).

    ``cpu_usage`` is the system's busy CPU time since the previous reading relative to the
    effective CPUs; ``memory_usage`` the worker's and its children's RSS relative to the
    effective RAM; ``gpu_usage`` NVML utilisation per allowed GPU (empty without NVML).
    """

    cpu_cores: int
    ram_bytes: int
    gpu_uuids: tuple[str, ...] = ()
    clock: Callable[[], float] = time.monotonic
    _last_busy: float = field(init=False, repr=False)
    _last_time: float = field(init=False, repr=False)
    _last_cpu: float = field(init=False, default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._last_busy = busy_seconds()
        self._last_time = self.clock()

    def cpu_usage(self) -> float:
        """Busy fraction of the effective CPUs since the previous call (0.0–1.0)."""
        now, busy = self.clock(), busy_seconds()
        elapsed = now - self._last_time
        if elapsed >= 0.05:  # shorter windows are noise; keep the previous reading
            self._last_cpu = min(1.0, max(0.0, (busy - self._last_busy) / (elapsed * self.cpu_cores)))
            self._last_busy, self._last_time = busy, now
        return self._last_cpu

    def memory_usage(self) -> float:
        """RSS of the worker and all its descendants relative to the effective RAM (0.0–1.0)."""
        import psutil

        me = psutil.Process()
        rss = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return min(1.0, rss / self.ram_bytes) if self.ram_bytes > 0 else 0.0

    def gpu_usage(self) -> list[float]:
        """NVML utilisation (0.0–1.0) per allowed GPU; empty without NVML."""
        if not self.gpu_uuids:
            return []
        try:
            import pynvml  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return []
        try:
            return [
                pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByUUID(uuid)).gpu / 100.0
                for uuid in self.gpu_uuids
            ]
        except pynvml.NVMLError:
            return []
        finally:
            pynvml.nvmlShutdown()

    def load_metrics(
        self,
        *,
        active_plans: int,
        queue_depth: int,
        free_slots: int,
        max_concurrent: int,
        sessions: int,
    ) -> dict[str, Any]:
        """A ``LoadMetrics`` dict: ``cpu_usage, memory_usage, gpu_usage, active_plans, queue_depth,
        timestamp`` (RFC 3339, UTC) plus ``free_slots, max_concurrent, sessions``."""
        return {
            "cpu_usage": self.cpu_usage(),
            "memory_usage": self.memory_usage(),
            "gpu_usage": self.gpu_usage(),
            "active_plans": active_plans,
            "queue_depth": queue_depth,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "free_slots": free_slots,
            "max_concurrent": max_concurrent,
            "sessions": sessions,
        }
