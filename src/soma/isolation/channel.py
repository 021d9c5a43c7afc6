"""Frames over file descriptors: the channel between a parent and its filter daemon child.

One frame carries one message (isolation.md §3.1)::

    b"SOMD" | u32 version (1) | u64 payload length | u32 buffer count k | k x u64 buffer length
    | payload = pickle.dumps(msg, protocol=5, buffer_callback=...) | the k buffers, raw

All integers are little-endian. Out-of-band buffers (numpy arrays, tensor bytes) are
never copied into the payload: the writer hands their memory to ``os.writev`` and the
reader fills one pre-sized buffer per array, so an array costs one copy per side and
arrives writable. Small buffers arrive as ``bytearray``; large ones as a
``pickle.PickleBuffer`` over an anonymous map, faulted in up front or reused warm once
its previous values are gone (first-touch page faults otherwise halve the reader's
speed); it still pickles, out of band, when a parent relays it to another channel.

A pipe moves under 1 GB/s, so a channel may add a ``Ring`` per direction: buffers of
4 MiB or more then cross a small shared-memory ring chunk by chunk, and their header
length carries bit 63 with one token byte per chunk in the stream instead of the bytes.

Waking a process blocked in ``poll`` costs tens of microseconds each way, which
dominates small calls, so a reader first spins on a zero-timeout ``poll`` for at most
``SPIN_SECONDS`` before it sleeps. The spin adapts per fd: where it does not pay off
(busy machine, slow peer) it shrinks to nothing, so an idle reader burns no CPU.

Stdlib only: the parent (which never unpickles user objects, see ``restricted_loads``)
and the child both import this module.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MAGIC",
    "MAX_BUFFERS",
    "SPIN_SECONDS",
    "Ring",
    "VERSION",
    "ChannelClosed",
    "FrameError",
    "is_allowed_global",
    "read_frame",
    "restricted_loads",
    "tune_pipe",
    "write_frame",
]

MAGIC = b"SOMD"
VERSION = 1
MAX_BUFFERS = 1_000_000
DEFAULT_MAX_FRAME = 64 << 30
SPIN_SECONDS = 200e-6
"""The longest a reader spins on a silent fd before it sleeps in ``poll``."""

_HEADER = struct.Struct("<4sIQI")
_LENGTH = struct.Struct("<Q")
_IOV_MAX = 1024
# Buffers at least this large are read into pre-faulted, reused anonymous maps (_ReceivePool).
_LARGE_BUFFER = 4 << 20
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_POOL_BYTES = 1 << 30
_POOL_IDLE_SECONDS = 10.0
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
# A buffer sent through a Ring has this bit set in its header length; its bytes in the
# stream are one _RING_TOKEN per chunk.
_IN_RING = 1 << 63
# Frames without buffers up to this size are written with one os.write and read with os.read.
_SMALL_FRAME = 64 << 10
_RING_TOKEN = b"R"
_RING_ACK = b"A"
_RING_SLOTS = 2
_RING_BYTES = 16 << 20

Loads = Callable[[Any, list[Any]], Any]


class FrameError(Exception):
    """A corrupt frame: bad magic or version, too many buffers, or a length above the limit."""


class ChannelClosed(EOFError):
    """The other end closed the channel (EOF), at a frame boundary or inside a frame."""


def write_frame(
    fd: int,
    msg: Any,
    *,
    deadline: float | None = None,
    reducer_override: Callable[[Any], Any] | None = None,
    ring: Ring | None = None,
) -> int:
    """Pickle ``msg`` (protocol 5) and write it to ``fd`` as one frame; return the bytes written.

    The payload is pickled before anything is written, so a message that cannot be
    pickled raises (``pickle.PicklingError``, ``TypeError``...) and leaves the channel
    intact. Buffers are written from their own memory, never concatenated; partial
    writes and non-blocking fds are handled. ``deadline`` (a ``time.monotonic()``
    value) bounds the time spent waiting for the reader to drain the pipe and raises
    ``TimeoutError``; it needs a non-blocking fd, so giving one makes ``fd`` non-blocking.
    ``BrokenPipeError`` means the reader is gone. ``reducer_override`` is installed on
    the pickler (see ``pickle.Pickler.reducer_override``); whatever it raises propagates
    before anything is written. With ``ring`` (whose reader passes its twin to
    ``read_frame``), buffers of at least 4 MiB travel through its shared memory.
    """
    pickle_buffers: list[pickle.PickleBuffer] = []
    if reducer_override is None:
        payload: bytes | memoryview = pickle.dumps(msg, protocol=5, buffer_callback=pickle_buffers.append)
    else:
        stream = io.BytesIO()
        _OverridingPickler(stream, pickle_buffers.append, reducer_override).dump(msg)
        payload = stream.getvalue() if stream.tell() <= _SMALL_FRAME else stream.getbuffer()
    payload_len = memoryview(payload).nbytes
    if not pickle_buffers and payload_len <= _SMALL_FRAME:
        # Most frames are small: one write of one bytes object, no view bookkeeping.
        frame = _HEADER.pack(MAGIC, VERSION, payload_len, 0) + payload
        try:
            written = os.write(fd, frame)
        except BlockingIOError:
            written = 0
        if written == len(frame):
            return written
        if deadline is not None and os.get_blocking(fd):
            os.set_blocking(fd, False)
        return written + _write_all(fd, [memoryview(frame)[written:]], deadline)
    raw_buffers = [buffer.raw() for buffer in pickle_buffers]
    header = bytearray(_HEADER.pack(MAGIC, VERSION, payload_len, len(raw_buffers)))
    in_ring = [ring is not None and view.nbytes >= _LARGE_BUFFER for view in raw_buffers]
    for view, flagged in zip(raw_buffers, in_ring):
        header += _LENGTH.pack(view.nbytes | _IN_RING if flagged else view.nbytes)
    if deadline is not None and os.get_blocking(fd):
        os.set_blocking(fd, False)
    if ring is None or not any(in_ring):
        return _write_all(fd, [memoryview(header), memoryview(payload), *raw_buffers], deadline)
    total = 0
    pending = [memoryview(header), memoryview(payload)]
    for view, flagged in zip(raw_buffers, in_ring):
        if not flagged:
            pending.append(view)
            continue
        total += _write_all(fd, pending, deadline)
        pending = []
        total += ring.send(fd, view, deadline)
    return total + _write_all(fd, pending, deadline)


class _OverridingPickler(pickle.Pickler):
    def __init__(
        self,
        stream: io.BytesIO,
        buffer_callback: Callable[[pickle.PickleBuffer], None],
        override: Callable[[Any], Any],
    ) -> None:
        super().__init__(stream, protocol=5, buffer_callback=buffer_callback)
        self._override = override

    def reducer_override(self, obj: Any) -> Any:
        return self._override(obj)


def _write_all(fd: int, views: list[memoryview], deadline: float | None) -> int:
    views = [v for v in views if v.nbytes]
    total = 0
    start = 0
    while start < len(views):
        try:
            written = os.writev(fd, views[start : start + _IOV_MAX])
        except BlockingIOError:
            _wait(fd, select.POLLOUT, deadline)
            continue
        total += written
        start = _advance(views, start, written)
    return total


def read_frame(
    fd: int,
    *,
    deadline: float | None = None,
    loads: Loads | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    ring: Ring | None = None,
) -> Any:
    """Read one frame from ``fd`` and return its message.

    ``deadline`` is a ``time.monotonic()`` value (``None``: wait forever); reaching it
    raises ``TimeoutError``, after which the channel is out of step and must be
    dropped. ``loads(payload, buffers)`` turns the payload into the message (default
    ``pickle.loads``; the parent passes ``restricted_loads``). Raises ``ChannelClosed``
    on EOF and ``FrameError`` on a corrupt header. ``fd`` is made non-blocking. ``ring``
    is the shared-memory twin of the writer's (see ``write_frame``); without one, a frame
    that uses a ring is corrupt.
    """
    if os.get_blocking(fd):
        os.set_blocking(fd, False)
    header = _read_bytes(fd, _HEADER.size, deadline, at_boundary=True)
    magic, version, payload_len, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version}, expected {VERSION}")
    if count > MAX_BUFFERS:
        raise FrameError(f"frame declares {count} buffers, more than the limit of {MAX_BUFFERS}")
    if payload_len > max_frame:
        raise FrameError(f"frame payload of {payload_len} bytes exceeds the limit of {max_frame}")
    if not count and payload_len <= _SMALL_FRAME:
        payload_bytes = _read_bytes(fd, payload_len, deadline)
        if loads is None:
            return pickle.loads(payload_bytes)
        return loads(payload_bytes, [])
    lengths: tuple[int, ...] = ()
    flags: tuple[bool, ...] = ()
    if count:
        raw_lengths = bytearray(_LENGTH.size * count)
        _read_exact(fd, [memoryview(raw_lengths)], deadline)
        flagged = struct.unpack(f"<{count}Q", raw_lengths)
        flags = tuple(bool(n & _IN_RING) for n in flagged)
        lengths = tuple(n & ~_IN_RING for n in flagged)
        if ring is None and any(flags):
            raise FrameError("frame sends buffers through shared memory, but this channel has none")
        size = payload_len + sum(lengths)
        if size > max_frame:
            raise FrameError(f"frame of {size} bytes exceeds the limit of {max_frame}")
    payload = bytearray(payload_len)
    buffers = [_allocate(n) for n in lengths]
    if ring is None or not any(flags):
        _read_exact(fd, [memoryview(payload), *(memoryview(b) for b in buffers)], deadline)
    else:
        pending = [memoryview(payload)]
        for buffer, flag in zip(buffers, flags):
            if not flag:
                pending.append(memoryview(buffer))
                continue
            _read_exact(fd, pending, deadline)
            pending = []
            ring.receive(fd, memoryview(buffer), deadline)
        _read_exact(fd, pending, deadline)
    if loads is None:
        return pickle.loads(payload, buffers=buffers)
    return loads(payload, buffers)


def _allocate(size: int) -> bytearray | pickle.PickleBuffer:
    if size < _LARGE_BUFFER:
        return bytearray(size)
    return _ReceivePool.take(size)


class _ReceivePool:
    """Large receive buffers, kept after their values are dropped for later frames to reuse.

    Fresh memory costs a page fault per 4 KiB page on first touch, which halves the
    reader's speed; new maps are therefore faulted in up front in one kernel call
    (``MAP_POPULATE``), and maps whose values are gone are reused warm. A map is free
    when nothing but the pool refers to it: every array, tensor or view over it holds
    a reference through the buffer protocol. At most ``_POOL_BYTES`` are kept, and
    free maps unused for ``_POOL_IDLE_SECONDS`` are released (``_wait`` wakes a
    sleeping reader for that), so an idle process gives the memory back.
    """

    lock = threading.Lock()
    maps: list[tuple[mmap.mmap, list[float]]] = []  # (map, [last used, monotonic])

    @classmethod
    def take(cls, size: int) -> pickle.PickleBuffer:
        with cls.lock:
            now = time.monotonic()
            cls._release(now - _POOL_IDLE_SECONDS)
            free = [entry for entry in cls.maps if cls._is_free(entry) and size <= len(entry[0]) <= 2 * size]
            if free:
                buffer, used = min(free, key=lambda entry: len(entry[0]))
                used[0] = now
                return pickle.PickleBuffer(memoryview(buffer)[:size] if len(buffer) != size else buffer)
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE)
            if size <= _POOL_BYTES:
                cls._release(now, keep=_POOL_BYTES - size)
                if sum(len(entry[0]) for entry in cls.maps) + size <= _POOL_BYTES:
                    cls.maps.append((buffer, [now]))
            return pickle.PickleBuffer(buffer)

    @classmethod
    def trim(cls) -> None:
        """Release free maps unused for ``_POOL_IDLE_SECONDS``."""
        with cls.lock:
            cls._release(time.monotonic() - _POOL_IDLE_SECONDS)

    @classmethod
    def holds_free(cls) -> bool:
        return any(cls._is_free(entry) for entry in cls.maps)

    @classmethod
    def _release(cls, unused_since: float, keep: int | None = None) -> None:
        """Drop free maps last used before ``unused_since``, oldest first; with ``keep``, until that many bytes remain."""
        for entry in sorted(cls.maps, key=lambda entry: entry[1][0]):
            if keep is not None and sum(len(e[0]) for e in cls.maps) <= keep:
                return
            if entry[1][0] < unused_since and cls._is_free(entry):
                cls.maps.remove(entry)

    @staticmethod
    def _is_free(entry: tuple[mmap.mmap, list[float]]) -> bool:
        return sys.getrefcount(entry[0]) == _FREE_REFS


def _free_refs() -> int:
    """What ``sys.getrefcount`` reports for a pooled map nothing else refers to, on this interpreter."""
    entry = (mmap.mmap(-1, mmap.PAGESIZE), [0.0])
    refs = sys.getrefcount(entry[0])
    entry[0].close()
    return refs


_FREE_REFS = _free_refs()


class Ring:
    """One direction of a channel's bulk path: a small shared-memory ring for large buffers.

    A pipe moves well under 1 GB/s, while copying into memory that is already mapped
    runs at memcpy speed. The writer copies a large buffer into the ring one slot-sized
    chunk at a time and sends a one-byte token per chunk down the frame's pipe; the
    reader copies each chunk out and answers with a one-byte ack on the *other* pipe
    (which carries nothing else then: requests and replies alternate), so the writer
    reuses a slot only once its chunk is read. The ring stays small and warm whatever
    the buffer's size; ``write_frame`` returns once every chunk was acknowledged.

    Both ends build a ``Ring`` over the same memfd: the writer with ``ack_fd`` = the
    read end of the other pipe, the reader with ``ack_fd`` = its write end.
    """

    def __init__(self, memfd: int, ack_fd: int) -> None:
        self.memfd = memfd
        self.ack_fd = ack_fd
        self._view: memoryview | None = None  # mapped on first use: idle children touch nothing

    @staticmethod
    def create_memfd() -> int | None:
        """A new ring-sized memfd to share with a child, or ``None`` where memfds are unavailable."""
        try:
            memfd = os.memfd_create("soma-ring")
            os.ftruncate(memfd, _RING_BYTES)
        except (AttributeError, OSError):
            return None
        return memfd

    def _slots(self) -> tuple[memoryview, int]:
        if self._view is None:
            size = os.fstat(self.memfd).st_size
            if size < _RING_SLOTS:
                raise FrameError(f"shared ring of {size} bytes is too small")
            self._view = memoryview(mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED))
        return self._view, len(self._view) // _RING_SLOTS

    def send(self, fd: int, view: memoryview, deadline: float | None) -> int:
        """Move ``view`` through the ring, announcing each chunk on ``fd``; return the stream bytes written."""
        ring, slot = self._slots()
        if os.get_blocking(self.ack_fd):
            os.set_blocking(self.ack_fd, False)
        chunks = -(-view.nbytes // slot)
        unacked = 0
        for index in range(chunks):
            if unacked == _RING_SLOTS:
                unacked -= self._acks(unacked, deadline)
            start = (index % _RING_SLOTS) * slot
            chunk = view[index * slot : (index + 1) * slot]
            ring[start : start + chunk.nbytes] = chunk
            _write_all(fd, [memoryview(_RING_TOKEN)], deadline)
            unacked += 1
        while unacked:
            unacked -= self._acks(unacked, deadline)
        return chunks

    def _acks(self, most: int, deadline: float | None) -> int:
        """Wait for 1 to ``most`` acks; never more, as the peer's next frame may follow them."""
        while True:
            try:
                acks = os.read(self.ack_fd, most)
            except BlockingIOError:
                _wait(self.ack_fd, select.POLLIN, deadline)
                continue
            if not acks:
                raise BrokenPipeError("the reader closed the channel during a shared-memory transfer")
            if acks.strip(_RING_ACK):
                raise FrameError(f"expected shared-memory acks, got {acks!r}")
            return len(acks)

    def receive(self, fd: int, view: memoryview, deadline: float | None) -> None:
        """Fill ``view`` from the ring, chunk by chunk as ``fd`` announces them."""
        ring, slot = self._slots()
        token = bytearray(1)
        for index in range(-(-view.nbytes // slot)):
            _read_exact(fd, [memoryview(token)], deadline)
            if token != _RING_TOKEN:
                raise FrameError(f"expected a shared-memory chunk token, got {bytes(token)!r}")
            start = (index % _RING_SLOTS) * slot
            chunk = view[index * slot : (index + 1) * slot]
            chunk[:] = ring[start : start + chunk.nbytes]
            try:
                os.write(self.ack_fd, _RING_ACK)
            except BrokenPipeError as exc:
                raise ChannelClosed("channel closed by the other end during a shared-memory transfer") from exc


def _advance(views: list[memoryview], start: int, done: int) -> int:
    """Drop ``done`` transferred bytes from the front of ``views[start:]``; return the new start.

    ``readv``/``writev`` may stop anywhere, even inside a view, which is then trimmed in place.
    """
    while done:
        head = views[start]
        if done >= head.nbytes:
            done -= head.nbytes
            start += 1
        else:
            views[start] = head[done:]
            done = 0
    return start


def _read_bytes(fd: int, size: int, deadline: float | None, *, at_boundary: bool = False) -> bytes | bytearray:
    """Read exactly ``size`` (small) bytes: one ``os.read`` when they are there, as they usually are."""
    try:
        data = os.read(fd, size)
    except BlockingIOError:
        data = b""
    else:
        if len(data) == size:
            return data
        if not data and size:
            if at_boundary:
                raise ChannelClosed("channel closed by the other end")
            raise ChannelClosed(f"channel closed inside a frame (0 of {size} bytes of a section read)")
    buffer = bytearray(size)
    buffer[: len(data)] = data
    _read_exact(fd, [memoryview(buffer)[len(data) :]], deadline, at_boundary=at_boundary and not data)
    return buffer


def _read_exact(fd: int, views: list[memoryview], deadline: float | None, *, at_boundary: bool = False) -> None:
    """Fill every view from ``fd``, in order, with as few ``readv`` calls as the data allows."""
    views = [v for v in views if v.nbytes]
    expected = sum(v.nbytes for v in views)
    received = 0
    start = 0
    while start < len(views):
        try:
            n = os.readv(fd, views[start : start + _IOV_MAX])
        except BlockingIOError:
            _wait(fd, select.POLLIN, deadline)
            continue
        if n == 0:
            if at_boundary and received == 0:
                raise ChannelClosed("channel closed by the other end")
            raise ChannelClosed(f"channel closed inside a frame ({received} of {expected} bytes of a section read)")
        received += n
        start = _advance(views, start, n)


class _Spin:
    """How long a reader spins on one fd before sleeping, adapted to how often spinning pays off.

    A spin pays off when the peer answers within it, which needs a free core for the
    peer and a quick answer. On a busy machine, or with a peer computing for
    milliseconds, spins fail and the fd's budget shrinks to nothing, so its reader
    sleeps at once; every ``_REPROBE_AFTER`` sleeps a short spin is tried again.
    Races between threads only blur the estimate.
    """

    budgets: dict[int, float] = {}
    sleeps: dict[int, int] = {}

    @classmethod
    def budget(cls, fd: int) -> float:
        return cls.budgets.get(fd, SPIN_SECONDS)

    @classmethod
    def succeeded(cls, fd: int) -> None:
        cls.budgets[fd] = min(SPIN_SECONDS, max(cls.budget(fd) * 2, _MIN_SPIN))

    @classmethod
    def failed(cls, fd: int) -> None:
        budget = cls.budget(fd)
        cls.budgets[fd] = budget / 4 if budget >= 4 * _MIN_SPIN else 0.0

    @classmethod
    def slept(cls, fd: int) -> None:
        sleeps = cls.sleeps[fd] = cls.sleeps.get(fd, 0) + 1
        if cls.budget(fd) == 0.0 and sleeps % _REPROBE_AFTER == 0:
            cls.budgets[fd] = _MIN_SPIN


_MIN_SPIN = 20e-6
_REPROBE_AFTER = 32


def _wait(fd: int, event: int, deadline: float | None) -> None:
    """Return once ``fd`` is ready for ``event``: spin briefly on a zero-timeout poll, then sleep in it."""
    poller = select.poll()
    poller.register(fd, event)
    budget = _Spin.budget(fd) if event == select.POLLIN else 0.0
    if budget:
        spin_until = time.monotonic() + budget
        while time.monotonic() < spin_until:
            if poller.poll(0):
                _Spin.succeeded(fd)
                return
            os.sched_yield()
        _Spin.failed(fd)
    if event == select.POLLIN:
        _Spin.slept(fd)
    while True:
        timeout_ms = -1 if deadline is None else _remaining_ms(deadline)
        if event == select.POLLIN and _ReceivePool.holds_free():
            # Wake up once in a while to give idle receive buffers back.
            trim_ms = int(_POOL_IDLE_SECONDS * 1000)
            timeout_ms = trim_ms if timeout_ms < 0 else min(timeout_ms, trim_ms)
        if poller.poll(timeout_ms):
            return
        _ReceivePool.trim()


def _remaining_ms(deadline: float) -> int:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("nothing arrived on the channel before the deadline")
    return max(1, int(remaining * 1000 + 0.999))


_ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "bytearray"),
        ("builtins", "bytes"),
        ("builtins", "complex"),
        ("builtins", "dict"),
        ("builtins", "frozenset"),
        ("builtins", "list"),
        ("builtins", "range"),
        ("builtins", "set"),
        ("builtins", "slice"),
        ("builtins", "tuple"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("soma.isolation.markers", "Concat"),
        ("soma.isolation.markers", "Handle"),
        ("soma.isolation.markers", "Opaque"),
        ("soma.isolation.markers", "TorchData"),
    }
)


def is_allowed_global(module: str, name: str) -> bool:
    """Whether ``restricted_loads`` lets a pickle refer to the global ``module.name``."""
    return (module, name) in _ALLOWED_GLOBALS


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed on the channel: only builtin containers, "
                "numpy arrays, dtypes and scalars, and soma.isolation.markers classes may cross it"
            )
        return super().find_class(module, name)


def restricted_loads(payload: Any, buffers: list[Any]) -> Any:
    """Unpickle a child's payload, refusing any global but containers, numpy values and markers.

    The parent never unpickles user objects: those travel inside ``Opaque`` markers as
    bytes. Anything else is a daemon bug and raises ``pickle.UnpicklingError``.
    """
    return _RestrictedUnpickler(io.BytesIO(payload), buffers=buffers).load()


def tune_pipe(fd: int) -> int:
    """Enlarge the kernel buffer of the pipe behind ``fd`` as far as allowed; return its size.

    A default 64 KiB pipe moves well under 1 GB/s because reader and writer wake each
    other every 64 KiB. Failures (not Linux, not a pipe, limit lowered) are ignored:
    the pipe then keeps its size, and 0 is returned where it cannot be read.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows has no fcntl
        return 0
    try:
        with open(_PIPE_MAX_SIZE, encoding="ascii") as limit_file:
            limit = int(limit_file.read())
    except (OSError, ValueError):
        limit = 1 << 20
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, limit)
    except OSError:
        try:
            return fcntl.fcntl(fd, _F_GETPIPE_SZ)
        except OSError:
            return 0
