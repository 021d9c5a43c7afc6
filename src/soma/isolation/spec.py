"""``ChildSpec``: how to launch a filter daemon child, and the limits it runs under.

A spec is pure data: its pool key, the environment it builds (isolation.md §2.1)
and the command line that starts ``soma.isolation.daemon``. Kept apart from the
process machinery because the pool, the worker and the local runtime build and
compare specs without ever starting a child.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import soma
from soma.errors import SomaConfigError
from soma.isolation.limits import THREAD_VARIABLES

__all__ = ["ChildSpec"]

_LAUNCH = "import soma.isolation.daemon as d; d.main()"
_SOMA_LINK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(soma.__file__)))


@dataclass(frozen=True)
class ChildSpec:
    """How to launch a child, and the limits it runs under.

    Children with equal ``pool_key`` are interchangeable and pooled together; the other
    fields are launch options and limits. ``extra_env`` is copied into a read-only
    mapping so a spec stays immutable.
    """

    interpreter: str = field(default_factory=lambda: sys.executable)
    env_key: str = "default"
    cuda_visible_devices: str | None = None
    threads: int | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict, hash=False)
    work_root: str | None = None
    memory_limit: int | None = None
    rlimit_as: int | None = None
    cpu_affinity: frozenset[int] | None = None
    start_timeout: float = 30.0
    pythonpath: str = _SOMA_LINK_DIR
    max_frame: int | None = None

    def __post_init__(self) -> None:
        extra = {str(k): str(v) for k, v in dict(self.extra_env).items()}
        object.__setattr__(self, "extra_env", types.MappingProxyType(extra))
        if self.cpu_affinity is not None:
            object.__setattr__(self, "cpu_affinity", frozenset(self.cpu_affinity))
        if self.threads is not None and self.threads < 1:
            raise SomaConfigError(f"threads must be >= 1, got {self.threads}")
        if self.start_timeout <= 0:
            raise SomaConfigError(
                f"start_timeout must be > 0, got {self.start_timeout}"
            )
        for name in ("memory_limit", "rlimit_as", "max_frame"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SomaConfigError(
                    f"{name} must be a positive number of bytes, got {value}"
                )

    @property
    def pool_key(self) -> tuple[str, str, str | None, int | None]:
        """(interpreter realpath, environment key, visible GPU set, thread count)."""
        return (
            os.path.realpath(self.interpreter),
            self.env_key,
            self.cuda_visible_devices,
            self.threads,
        )

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment (isolation.md §2.1), built from ``base`` (default ``os.environ``).

        Every ``SOMA_*`` variable but ``SOMA_LOG_LEVEL`` is dropped so no token leaks into
        user code. Thread variables the operator set in ``base`` keep their values.
        """
        base = os.environ if base is None else base
        env = {
            k: v
            for k, v in base.items()
            if not k.startswith("SOMA_") or k == "SOMA_LOG_LEVEL"
        }
        env.update(self.extra_env)
        if self.threads is not None:
            for name in THREAD_VARIABLES:
                env.setdefault(name, str(self.threads))
        inherited = base.get("PYTHONPATH")
        env["PYTHONPATH"] = self.pythonpath + (
            os.pathsep + inherited if inherited else ""
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["SOMA_CHILD"] = "1"
        if self.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        return env

    def command(
        self, request_fd: int, reply_fd: int, ring_fds: tuple[int, int] | None = None
    ) -> list[str]:
        """The launch command line; the child reads requests from ``request_fd``.

        ``ring_fds`` are the memfds of the request and reply ``channel.Ring``.
        """
        argv = [self.interpreter, "-c", _LAUNCH, "--fds", f"{request_fd},{reply_fd}"]
        if ring_fds is not None:
            argv += ["--rings", f"{ring_fds[0]},{ring_fds[1]}"]
        if self.rlimit_as is not None:
            argv += ["--rlimit-as", str(self.rlimit_as)]
        return argv
