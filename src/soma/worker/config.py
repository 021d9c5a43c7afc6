"""Worker configuration: flag parsing, validation and the resolved ``WorkerConfig``.

Two front doors build the same frozen ``WorkerConfig``:

    argv + environ --config_from_args--> WorkerConfig   (``soma-worker``; flag > env var > default)
    keyword args   --embedded_config---> WorkerConfig   (``soma.Worker``; no environment variables)

Every failure is a ``SomaConfigError`` with a one-line reason; the CLI prints it and exits 2.
Nothing here sends network traffic; the only file-system check is that ``--data-store`` is
a directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from soma.errors import SomaConfigError
from soma.hosts import is_loopback

__all__ = [
    "INLINE_THRESHOLD",
    "LOG_LEVELS",
    "WEAK_TOKEN_LENGTH",
    "WorkerConfig",
    "advertise_address",
    "build_parser",
    "check_bind",
    "config_from_args",
    "default_host",
    "embedded_config",
    "parse_duration",
    "parse_size",
    "parse_tags",
    "sanitize_worker_id",
    "validate_worker_id",
]

KIB = 1024
MIB = 1024**2
GIB = 1024**3

WEAK_TOKEN_LENGTH = 16
"""Tokens shorter than this are accepted but logged as weak."""

INLINE_THRESHOLD = 10 * MIB
"""The default ``--inline-threshold``, ``soma.wire.messages.INLINE_THRESHOLD_BYTES`` (§4.5): restated so
that reading the worker's flags does not import the wire protocol's message classes."""

LOG_LEVELS = ("debug", "info", "warning", "error")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    **{unit: KIB for unit in ("k", "kb", "kib")},
    **{unit: MIB for unit in ("m", "mb", "mib")},
    **{unit: GIB for unit in ("g", "gb", "gib")},
    **{unit: 1024**4 for unit in ("t", "tb", "tib")},
}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Patterns, not compiled ones: ``re`` compiles each on first use (and caches it), so a
# worker start does not compile the ones its flags never need.
_NUMBER_AND_UNIT = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*"
_WORKER_ID = r"[A-Za-z0-9._-]{1,64}"
_WORKER_ID_BAD_CHAR = r"[^A-Za-z0-9._-]"


# --------------------------------------------------------------------------- values


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``8G``, ``1.5 GiB``, ``512m`` or ``1048576``.

    Every unit is binary (``8G`` == ``8GB`` == ``8GiB`` == 8 * 2**30, Soma 0.2.43's
    meaning of ``G``); fractional results are rounded down to whole bytes. Raises
    ``SomaConfigError`` for anything else, so a typo never becomes 0.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise SomaConfigError(f"invalid size {text!r}: expected an int or a string such as '8G'")
    if isinstance(text, int):
        if text < 0:
            raise SomaConfigError(f"invalid size {text}: must not be negative")
        return text
    match = re.fullmatch(_NUMBER_AND_UNIT, text, re.ASCII)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise SomaConfigError(
            f"invalid size {text!r}: use a number with an optional unit "
            "B, K, KB, KiB, M, MB, MiB, G, GB, GiB, T, TB or TiB (e.g. 8G)"
        )
    return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float) -> float:
    """Parse a duration in seconds: a plain number, or a number with ``s``, ``m``, ``h``, ``d`` or ``w``.

    ``parse_duration("7d") == 604800.0``. Raises ``SomaConfigError`` on anything else.
    """
    if isinstance(text, bool) or not isinstance(text, int | float | str):
        raise SomaConfigError(f"invalid duration {text!r}: expected seconds or a string such as '7d'")
    if isinstance(text, int | float):
        if not 0 <= text < float("inf"):
            raise SomaConfigError(f"invalid duration {text!r}: must be a finite number >= 0")
        return float(text)
    match = re.fullmatch(_NUMBER_AND_UNIT, text, re.ASCII)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise SomaConfigError(
            f"invalid duration {text!r}: use seconds or a number with a unit s, m, h, d or w (e.g. 7d)"
        )
    return float(Decimal(match.group(1)) * _DURATION_UNITS[unit])


def parse_tags(values: Iterable[str] | str | None, *, has_gpu: bool) -> list[str]:
    """Return the worker's tags: ``gpu`` (when a GPU is allowed), then ``cpu``, then the extras.

    Each value is split on commas and trimmed; empties are dropped; duplicates are removed
    keeping the first occurrence. ``parse_tags(["a, b", "c,a"], has_gpu=False)`` is
    ``["cpu", "a", "b", "c"]``. Raises ``SomaConfigError`` for a value that is not a string.
    """
    automatic = ["gpu", "cpu"] if has_gpu else ["cpu"]
    return list(dict.fromkeys([*automatic, *_split_tags(values)]))


def _split_tags(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    tags: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise SomaConfigError(f"invalid tag {value!r}: tags are strings")
        tags.extend(part.strip() for part in value.split(","))
    return list(dict.fromkeys(tag for tag in tags if tag))


def sanitize_worker_id(name: str | None = None, *, pid: int | None = None) -> str:
    """Turn a host name (default: this machine's) into a valid worker id.

    Characters outside ``[A-Za-z0-9._-]`` become ``-`` and the result is cut to 64
    characters; an empty name gives ``worker-<pid>``.
    """
    if name is None:
        name = socket.gethostname()
    cleaned = re.sub(_WORKER_ID_BAD_CHAR, "-", name)[:64]
    return cleaned or f"worker-{os.getpid() if pid is None else pid}"


def validate_worker_id(worker_id: str) -> str:
    """Return ``worker_id`` if it matches ``[A-Za-z0-9._-]{1,64}``, else raise ``SomaConfigError``."""
    if not isinstance(worker_id, str) or not re.fullmatch(_WORKER_ID, worker_id):
        raise SomaConfigError(
            f"invalid worker id {worker_id!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return worker_id


# --------------------------------------------------------------------------- binding


def default_host(token: str | None) -> str:
    """The CLI's bind address when ``--host`` is absent: everywhere with a token, loopback without."""
    return "0.0.0.0" if token else "127.0.0.1"


def check_bind(host: str, *, token: str | None, insecure: bool, embedded: bool = False) -> None:
    """Refuse a non-loopback ``host`` without a token unless ``insecure`` (worker spec §2.2).

    The message names the remedy in the caller's vocabulary: keyword arguments for the
    embedded ``soma.Worker`` (api.md §10, exact text), flags for the CLI.
    """
    if token or insecure or is_loopback(host):
        return
    if embedded:
        raise SomaConfigError(
            f"refusing to listen on {host} without a token; pass token=... or insecure=True"
        )
    raise SomaConfigError(
        f"refusing to listen on {host} without a token; pass --token (or set SOMA_TOKEN) or --insecure"
    )


def advertise_address(host: str, port: int) -> str:
    """The ``ws://<ip>:<port>`` address registered with a coordinator when ``--advertise`` is absent.

    A specific bind address is used as is; for a wildcard bind, the local address of a UDP
    socket "connected" to 8.8.8.8:80 (no packet is sent), else ``127.0.0.1``. Never ``0.0.0.0``.
    """
    ip = host.strip("[]")
    if ip in ("", "0.0.0.0", "::"):
        ip = "127.0.0.1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect(("8.8.8.8", 80))
                ip = str(probe.getsockname()[0])
        except OSError:
            pass  # no route: loopback is the only address a client could use
    if ":" in ip:
        ip = f"[{ip}]"
    return f"ws://{ip}:{port}"


# --------------------------------------------------------------------------- the config


@dataclass(frozen=True, repr=False)  # its own __repr__ masks the tokens
class WorkerConfig:
    """Every setting of ``soma-worker`` (worker spec §2.1), resolved and validated.

    Sizes are bytes, durations seconds. ``tags`` holds only the extra tags (normalised);
    the effective list, with ``gpu``/``cpu`` first, is ``parse_tags(tags, has_gpu=...)``
    once GPUs are detected. ``temp_dir`` is ``None`` only with ``port == 0``: the store
    then lives in a fresh ``tempfile.mkdtemp`` directory made at startup.
    """

    worker_id: str
    python: str
    port: int = 8080
    host: str = "127.0.0.1"
    cpus: int | None = None
    memory: int | None = None
    gpus: int | None = None
    max_concurrent: int = 4
    tags: tuple[str, ...] = ()
    token: str | None = None
    insecure: bool = False
    coordinator: str | None = None
    coordinator_token: str | None = None
    advertise: str | None = None
    env_dir: Path = Path("/tmp/soma-envs")
    work_dir: Path = Path("/tmp/soma-work")
    temp_dir: Path | None = None
    data_store: Path | None = None
    timeout: float = 3600.0
    log_level: str = "info"
    # tuning
    max_queue: int = 64
    queue_timeout: float = 600.0
    drain_timeout: float = 30.0
    heartbeat_interval: float = 10.0
    store_ttl: float = 3600.0
    store_sweep: float = 300.0
    store_max_bytes: int | None = None
    max_upload_bytes: int = 4 * GIB
    max_message_bytes: int = 256 * MIB
    inline_threshold: int = INLINE_THRESHOLD
    cache_bytes: int = 1 * GIB
    cache_dir: Path | None = None
    env_timeout: float = 900.0
    max_env_builds: int = 2
    env_max_count: int = 20
    env_max_age: float = 7 * 86400.0
    use_uv: bool = True
    allow_python_download: bool = False
    prewarm: int = 1
    child_idle_ttl: float = 300.0
    max_idle_children: int | None = None
    child_max_tasks: int = 100
    child_max_idle_rss: int = 2 * GIB
    child_memory: int | None = None
    child_rlimit_as: int | None = None
    child_start_timeout: float = 30.0

    @property
    def auth(self) -> bool:
        """Whether clients must present the token."""
        return self.token is not None

    @property
    def weak_token(self) -> bool:
        """Whether a token is set and shorter than ``WEAK_TOKEN_LENGTH`` (log a WARNING)."""
        return self.token is not None and len(self.token) < WEAK_TOKEN_LENGTH

    @property
    def insecure_bind(self) -> bool:
        """Whether the worker listens beyond loopback without a token (log a WARNING)."""
        return self.token is None and not is_loopback(self.host)

    @property
    def logging_level(self) -> int:
        """``log_level`` as a ``logging`` constant."""
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    def __repr__(self) -> str:
        # Tokens never reach logs, even through a debug print of the config.
        masked = {"token": self.token, "coordinator_token": self.coordinator_token}
        fields = ", ".join(
            f"{name}={'***' if masked.get(name) else repr(getattr(self, name))}"
            for name in self.__dataclass_fields__
        )
        return f"WorkerConfig({fields})"


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class _Numeric:
    """A flag whose value is converted by kind and lands in the ``WorkerConfig`` field ``dest``."""

    flag: str
    kind: str  # "int", "size", "duration" or "dir"
    help: str
    minimum: float = 0

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_RESOURCE_FLAGS = (
    _Numeric("--cpus", "int", "cap the CPU cores offered (default: detected)", 1),
    _Numeric("--memory", "size", "cap the RAM offered, e.g. 8G (default: detected)", 1),
    _Numeric("--gpus", "int", "keep only the first N GPUs (default: all)"),
    _Numeric("--max-concurrent", "int", "execution slots (default 4)", 1),
)
_GENERAL_FLAGS = (
    _Numeric("--env-dir", "dir", "environments (default /tmp/soma-envs)"),
    _Numeric("--work-dir", "dir", "job and scratch directories (default /tmp/soma-work)"),
    _Numeric("--timeout", "duration", "upper bound on a plan's or job's execution time (default 3600)", 1e-9),
)
_TUNING_FLAGS = (
    _Numeric("--max-queue", "int", "waiters beyond the slots before 'busy' (default 64)"),
    _Numeric("--queue-timeout", "duration", "longest wait for a slot (default 600)", 1e-9),
    _Numeric("--drain-timeout", "duration", "grace period for running requests at shutdown (default 30)"),
    _Numeric("--heartbeat-interval", "duration", "coordinator heartbeat period (default 10)", 1e-9),
    _Numeric("--store-ttl", "duration", "idle lifetime of store files (default 3600)", 1e-9),
    _Numeric("--store-sweep", "duration", "store sweeper period (default 300)", 1e-9),
    _Numeric("--store-max-bytes", "size", "LRU-evict store files beyond this (default: none)", 1),
    _Numeric("--max-upload-bytes", "size", "largest upload body (default 4GiB)", 1),
    _Numeric("--max-message-bytes", "size", "largest WebSocket message (default 256MiB)", 1024),
    _Numeric("--inline-threshold", "size", "values at least this big go by reference (default 10MiB)"),
    _Numeric("--cache-bytes", "size", "memory cache budget (default 1GiB)"),
    _Numeric("--cache-dir", "dir", "disk cache directory (default: none)"),
    _Numeric("--env-timeout", "duration", "limit on one environment build (default 900)", 1e-9),
    _Numeric("--max-env-builds", "int", "concurrent environment builds (default 2)", 1),
    _Numeric("--env-max-count", "int", "environments kept (default 20)", 1),
    _Numeric("--env-max-age", "duration", "delete environments unused this long, e.g. 7d (default 7d)", 1e-9),
    _Numeric("--prewarm", "int", "idle children started at startup (default 1)"),
    _Numeric("--child-idle-ttl", "duration", "retire children idle this long (default 300)", 1e-9),
    _Numeric("--max-idle-children", "int", "idle children kept (default: unbounded)"),
    _Numeric("--child-max-tasks", "int", "retire a child after this many plans (default 100)", 1),
    _Numeric("--child-max-idle-rss", "size", "retire an idle child above this RSS (default 2GiB)", 1),
    _Numeric("--child-memory", "size", "RSS limit per child (default: none)", 1),
    _Numeric("--child-rlimit-as", "size", "address-space rlimit per child (default: none)", 1),
    _Numeric("--child-start-timeout", "duration", "limit on a child's start (default 30)", 1e-9),
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors raise ``SomaConfigError`` instead of exiting.

    ``--help`` and ``--version`` still print and raise ``SystemExit(0)``.
    """

    def error(self, message: str) -> NoReturn:
        raise SomaConfigError(message)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("soma-runtime")
    except PackageNotFoundError:  # pragma: no cover - only in an uninstalled source tree
        return "0+unknown"


class _PrintVersion(argparse.Action):
    """``--version``: the version is looked up only when asked, since the lookup scans the
    installed distributions and every start of the worker builds this parser."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show program's version number and exit")
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        sys.stdout.write(f"{parser.prog} {_version()}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``soma-worker`` argument parser (worker spec §2.1).

    Values stay strings; ``config_from_args`` converts and validates them and applies
    environment variables and defaults. Usage errors raise ``SomaConfigError``.
    """
    parser = _Parser(prog="soma-worker", description="Soma distributed execution worker")
    add = parser.add_argument
    add("-p", "--port", metavar="PORT", help="TCP port; 0 = ephemeral (default 8080)")
    add("--host", help="bind address (default 0.0.0.0 with a token, else 127.0.0.1)")
    for option in _RESOURCE_FLAGS:
        add(option.flag, metavar="SIZE" if option.kind == "size" else "N", help=option.help)
    add("--tags", action="extend", nargs="+", metavar="TAGS", help="extra tags, comma-separated, repeatable")
    add("--token", help="require this token from clients (env SOMA_TOKEN)")
    add("--insecure", action="store_true", help="allow a non-loopback bind without a token")
    add("--coordinator", metavar="URL", help="register with this coordinator (env SOMA_COORDINATOR)")
    add("--coordinator-token", metavar="T", help="coordinator token (env SOMA_COORDINATOR_TOKEN; default --token)")
    add("--advertise", metavar="URL", help="address registered with the coordinator (default ws://<ip>:<port>)")
    add("--id", dest="worker_id", metavar="ID", help="worker id (default: the host name)")
    for option in _GENERAL_FLAGS:
        add(option.flag, metavar="S" if option.kind == "duration" else "DIR", help=option.help)
    add("--temp-dir", metavar="DIR", help="upload/output store (default <tmp>/soma-worker-<id>-<port>)")
    add("--data-store", metavar="DIR", help="read-only data root (env SOMA_DATA_STORE)")
    add("--python", metavar="PATH", help="default child interpreter (env SOMA_PYTHON; default: this Python)")
    add("--log-level", metavar="L", help="debug, info, warning or error (env SOMA_LOG_LEVEL; default info)")
    tuning = parser.add_argument_group("tuning")
    metavars = {"int": "N", "size": "SIZE", "duration": "S", "dir": "DIR"}
    for option in _TUNING_FLAGS:
        tuning.add_argument(option.flag, metavar=metavars[option.kind], help=option.help)
    tuning.add_argument("--no-uv", dest="use_uv", action="store_false", help="build envs with venv and pip")
    tuning.add_argument("--allow-python-download", action="store_true", help="let uv download missing Pythons")
    add("--version", action=_PrintVersion)
    return parser


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """An environment variable, with an empty value counting as unset."""
    return environ.get(name) or None


def _nonempty(value: str | None, source: str) -> str | None:
    if value is not None and not value.strip():
        raise SomaConfigError(f"{source} must not be empty")
    return value


def _int(value: str | int, source: str, *, minimum: float, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise SomaConfigError(f"{source} must be an int, got {value!r}")
    try:
        number = value if isinstance(value, int) else int(value.strip())
    except (AttributeError, ValueError):
        raise SomaConfigError(f"{source}: invalid integer {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise SomaConfigError(f"{source} must be {bound}, got {number}")
    return number


def _convert(option: _Numeric, value: Any, source: str) -> Any:
    """Convert one flag or argument value by its kind, naming ``source`` in any error."""
    if option.kind == "int":
        return _int(value, source, minimum=option.minimum)
    if option.kind == "dir":
        if not str(value).strip():
            raise SomaConfigError(f"{source} must not be empty")
        return Path(value).expanduser()
    try:
        number: float = parse_size(value) if option.kind == "size" else parse_duration(value)
    except SomaConfigError as exc:
        raise SomaConfigError(f"{source}: {exc}") from None
    if number < option.minimum:
        bound = "greater than 0" if 0 < option.minimum < 1 else f"at least {option.minimum:g}"
        raise SomaConfigError(f"{source} must be {bound}, got {value!r}")
    return number


def _url(value: str | None, source: str, schemes: Sequence[str]) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in schemes or not parts.hostname:
        expected = " or ".join(f"{scheme}://host:port" for scheme in schemes)
        raise SomaConfigError(f"{source}: invalid URL {value!r}: expected {expected}")
    return value.strip().rstrip("/")


def _log_level(value: str, source: str) -> str:
    level = value.strip().lower() if isinstance(value, str) else ""
    if level not in LOG_LEVELS:
        raise SomaConfigError(f"{source}: invalid log level {value!r}: use {', '.join(LOG_LEVELS)}")
    return level


def _data_store(value: str | os.PathLike[str] | None, source: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if not str(value).strip() or not path.is_dir():
        raise SomaConfigError(f"{source}: {str(value)!r} is not a directory")
    return path


def _temp_dir(explicit: str | os.PathLike[str] | None, source: str, worker_id: str, port: int) -> Path | None:
    if explicit is not None:
        if not str(explicit).strip():
            raise SomaConfigError(f"{source} must not be empty")
        return Path(explicit).expanduser()
    if port == 0:
        return None
    return Path(tempfile.gettempdir()) / f"soma-worker-{worker_id}-{port}"


def config_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Parse ``soma-worker`` arguments into a ``WorkerConfig``: flag > environment variable > default.

    Raises ``SomaConfigError`` with a one-line reason for any invalid flag or value (the CLI
    prints it and exits 2); ``--help`` and ``--version`` print and raise ``SystemExit(0)``.
    """
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def from_env(flag_value: str | None, flag: str, variable: str) -> tuple[str | None, str]:
        if flag_value is not None:
            return _nonempty(flag_value, flag), flag
        return _env(env, variable), variable

    token = _nonempty(args.token, "--token") if args.token is not None else _env(env, "SOMA_TOKEN")
    coordinator_token, _ = from_env(args.coordinator_token, "--coordinator-token", "SOMA_COORDINATOR_TOKEN")
    host = _nonempty(args.host, "--host") or default_host(token)
    check_bind(host, token=token, insecure=args.insecure)
    port = 8080 if args.port is None else _int(args.port, "--port", minimum=0, maximum=65535)
    worker_id = sanitize_worker_id() if args.worker_id is None else validate_worker_id(args.worker_id)
    coordinator, coordinator_source = from_env(args.coordinator, "--coordinator", "SOMA_COORDINATOR")
    python, _ = from_env(args.python, "--python", "SOMA_PYTHON")
    log_level, log_source = from_env(args.log_level, "--log-level", "SOMA_LOG_LEVEL")
    data_store, data_source = from_env(args.data_store, "--data-store", "SOMA_DATA_STORE")

    converted = {
        option.dest: _convert(option, getattr(args, option.dest), option.flag)
        for option in (*_RESOURCE_FLAGS, *_GENERAL_FLAGS, *_TUNING_FLAGS)
        if getattr(args, option.dest) is not None
    }
    return WorkerConfig(
        worker_id=worker_id,
        python=python or sys.executable,
        port=port,
        host=host,
        tags=tuple(_split_tags(args.tags)),
        token=token,
        insecure=args.insecure,
        coordinator=_url(coordinator, coordinator_source, ("http", "https")),
        coordinator_token=coordinator_token or token,
        advertise=_url(_nonempty(args.advertise, "--advertise"), "--advertise", ("ws", "wss", "http", "https")),
        temp_dir=_temp_dir(args.temp_dir, "--temp-dir", worker_id, port),
        data_store=_data_store(data_store, data_source),
        log_level=_log_level(log_level or "info", log_source),
        use_uv=args.use_uv,
        allow_python_download=args.allow_python_download,
        **converted,
    )


# --------------------------------------------------------------------------- embedding


def embedded_config(
    port: int = 8080,
    tags: Iterable[str] | str | None = None,
    token: str | None = None,
    cpus: int | None = None,
    memory: int | str | None = None,
    gpus: int | None = None,
    max_concurrent: int = 4,
    worker_id: str | None = None,
    coordinator: str | None = None,
    *,
    host: str = "127.0.0.1",
    insecure: bool = False,
    python: str | None = None,
    env_dir: str | os.PathLike[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    data_store: str | os.PathLike[str] | None = None,
    timeout: float = 3600.0,
    log_level: str = "info",
) -> WorkerConfig:
    """Validate ``soma.Worker``'s constructor arguments (api.md §10, worker spec §2.4) into a config.

    Environment variables are not read and every tuning value is the CLI default; ``python``
    defaults to ``sys.executable`` (never PATH's ``python3``). Raises ``SomaConfigError``.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise SomaConfigError(f"port must be an int between 0 and 65535, got {port!r}")
    port = _int(port, "port", minimum=0, maximum=65535)
    if token is not None and (not isinstance(token, str) or not token):
        raise SomaConfigError("token must be a non-empty string, or None for no authentication")
    if not isinstance(host, str) or not host.strip():
        raise SomaConfigError(f"host must be a non-empty string, got {host!r}")
    check_bind(host, token=token, insecure=insecure, embedded=True)
    wid = sanitize_worker_id() if worker_id is None else validate_worker_id(worker_id)
    if python is not None and (not isinstance(python, str) or not python.strip()):
        raise SomaConfigError(f"python must be the path of an interpreter, got {python!r}")
    if coordinator is not None and not isinstance(coordinator, str):
        raise SomaConfigError(f"coordinator must be a URL string, got {coordinator!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise SomaConfigError(f"timeout must be a number of seconds, got {timeout!r}")

    given = {
        "cpus": cpus,
        "memory": memory,
        "gpus": gpus,
        "max_concurrent": max_concurrent,
        "env_dir": env_dir,
        "work_dir": work_dir,
        "timeout": timeout,
    }
    for name in ("cpus", "gpus", "max_concurrent"):
        value = given[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SomaConfigError(f"{name} must be an int, got {value!r}")
    options = {option.dest: option for option in (*_RESOURCE_FLAGS, *_GENERAL_FLAGS, *_TUNING_FLAGS)}
    converted = {name: _convert(options[name], value, name) for name, value in given.items() if value is not None}
    return WorkerConfig(
        worker_id=wid,
        python=python or sys.executable,
        port=port,
        host=host,
        tags=tuple(_split_tags(tags)),
        token=token,
        insecure=bool(insecure),
        coordinator=_url(coordinator, "coordinator", ("http", "https")),
        coordinator_token=token,
        temp_dir=_temp_dir(temp_dir, "temp_dir", wid, port),
        data_store=_data_store(data_store, "data_store"),
        log_level=_log_level(log_level, "log_level"),
        **converted,
    )
