"""Message types of the worker wire protocol (worker.md §5.5-§5.8), independent of any encoding.

Every message is a frozen dataclass tagged by a ``type`` literal. Requests (client ->
worker) carry the v2 correlation ``id``, replies (worker -> client) the ``re`` of the
request they answer; neither travels on v1, which correlates by plan, job or stream id.

Fields whose meaning differs between dialects (user values, states, plans, modes,
results, pickles, cache keys) carry a ``kind`` in their metadata, which the codecs
convert; ``soma.wire.schema`` maps every other field as plain data.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias

from soma.wire.errors import WireError

__all__ = [
    "CLIENT_MESSAGES",
    "DATA_REFS",
    "ERROR_CODES",
    "INLINE_THRESHOLD_BYTES",
    "MESSAGE_TYPES",
    "PLAN_CARRIERS",
    "PROTOCOLS",
    "RETRY_ONCE",
    "STREAM_MESSAGES",
    "V1_MESSAGES",
    "V2_MESSAGES",
    "WIRE_VERSION",
    "WORKER_MESSAGES",
    "Ack",
    "ApplyGradients",
    "AssignPlan",
    "AssignPythonJob",
    "CachedRef",
    "CancelPlan",
    "Capabilities",
    "ChunkData",
    "ChunkResult",
    "DataRef",
    "Error",
    "ErrorInfo",
    "Event",
    "FitMode",
    "GetGradients",
    "GetState",
    "GpuInfo",
    "GradientsResult",
    "Heartbeat",
    "Hello",
    "InlineRef",
    "JobFile",
    "JobProgress",
    "JobResult",
    "LoadMetrics",
    "LocalRef",
    "Message",
    "Mode",
    "Ping",
    "PlanFailure",
    "PlanOutcome",
    "PlanResult",
    "PlanSuccess",
    "Pong",
    "PythonPipelineJob",
    "Record",
    "Register",
    "Registered",
    "Reply",
    "Request",
    "S3Ref",
    "SerializedFilter",
    "SerializedPlan",
    "SetState",
    "Shutdown",
    "ShutdownAck",
    "StateResult",
    "Status",
    "StatusRequest",
    "StreamBegin",
    "StreamComplete",
    "StreamEnd",
    "StreamRef",
    "ZarrRef",
    "check_plan_id",
    "error_reply",
    "make_error",
    "validate_plan",
    "version_refusal",
]

#: A value whose encoded size reaches this many bytes travels by reference (§4.5).
INLINE_THRESHOLD_BYTES = 10 * 1024 * 1024
#: The binary protocol version this package writes.
WIRE_VERSION = 2
#: Every protocol version a Soma worker speaks.
PROTOCOLS: tuple[int, ...] = (1, 2)

# §5.8: code -> (kind, retryable). "once" in the spec is True here; RETRY_ONCE names them.
ERROR_CODES: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(
        ("protocol_mismatch", "hello_required", "bad_message", "bad_plan", "unsupported_plan"),
        ("Protocol", False),
    ),
    **dict.fromkeys(("unauthorized", "forbidden_path"), ("Auth", False)),
    **dict.fromkeys(("busy", "shutting_down"), ("Concurrency", True)),
    **dict.fromkeys(
        ("unknown_plan", "unknown_session", "unknown_stream", "unknown_node"), ("Protocol", False)
    ),
    **dict.fromkeys(("unresolved_reference", "unsupported_reference", "encoding_error"), ("Encoding", False)),
    **dict.fromkeys(
        ("env_failed", "env_timeout", "runtime_mismatch", "insufficient_resources"), ("Env", False)
    ),
    **dict.fromkeys(("child_start_failed", "child_crashed", "child_protocol_error"), ("Python", True)),
    **dict.fromkeys(
        (
            "user_error",
            "unpickle_error",
            "state_mismatch",
            "no_parameters",
            "no_gradient",
            "gradient_mismatch",
            "no_optimizer",
            "row_mismatch",
            "missing_dependency",
        ),
        ("Python", False),
    ),
    **dict.fromkeys(("timeout", "cancelled", "memory_limit"), ("Resource", False)),
    "internal": ("Transport", False),
    "worker_lost": ("Transport", True),
}
#: Retryable codes that deserve exactly one more try (a fresh child), not a retry loop.
RETRY_ONCE = frozenset({"child_start_failed", "child_crashed", "child_protocol_error"})

# Patterns, compiled (and cached) by ``re`` on first use rather than at import.
_PLAN_ID = r"[A-Za-z0-9._:-]{1,128}"
_HEX64 = r"[0-9a-f]{64}"


def _field(
    kind: str | None = None,
    *,
    optional: bool = False,
    only: str | None = None,
    default: Any = dataclasses.MISSING,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with wire metadata.

    ``kind`` names a dialect-specific conversion, ``optional`` omits the key when the
    value is None, ``only`` restricts the field to one dialect (``"v1"``/``"v2"``).
    """
    metadata = {"kind": kind, "optional": optional, "only": only}
    return field(default=default, default_factory=factory, metadata=metadata)


# --------------------------------------------------------------------------- records


class Record:
    """Base of every wire record, so the schema walker can tell records from user values.

    Records are frozen dataclasses declared with ``eq=False, repr=False``: their ``==``, hash
    and repr are defined here once, with the results the dataclass would generate, because
    generating them for every class was a third of the time it takes to import this module
    (which every worker does on its way to answering ``/health``).
    """

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in _field_names(type(self)).shown)
        return f"{self.__class__.__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _field_names(type(self)).compared
        return tuple(getattr(self, name) for name in names) == tuple(getattr(other, name) for name in names)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in _field_names(type(self)).hashed))


class _FieldNames:
    """The fields repr, ``==`` and hash use, by each field's ``repr``, ``compare`` and ``hash``."""

    __slots__ = ("compared", "hashed", "shown")

    def __init__(self, fields: tuple[dataclasses.Field[Any], ...]) -> None:
        self.shown = tuple(f.name for f in fields if f.repr)
        self.compared = tuple(f.name for f in fields if f.compare)
        self.hashed = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))


_FIELD_NAMES: dict[type, _FieldNames] = {}


def _field_names(cls: type) -> _FieldNames:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = _FieldNames(dataclasses.fields(cls))
    return names


@dataclass(frozen=True, eq=False, repr=False)
class GpuInfo(Record):
    """One GPU as advertised in ``Capabilities`` (index and uuid stay in ``/info``)."""

    name: str
    memory_bytes: int


@dataclass(frozen=True, eq=False, repr=False)
class Capabilities(Record):
    """What a worker offers (§3.2); exactly these keys on the wire."""

    cpu_cores: int
    ram_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    python_envs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False, repr=False)
class LoadMetrics(Record):
    """A load reading (§5.2): usages are fractions, ``timestamp`` is RFC 3339."""

    cpu_usage: float
    memory_usage: float
    gpu_usage: list[float]
    active_plans: int
    queue_depth: int
    timestamp: str
    free_slots: int | None = _field(optional=True, default=None)
    max_concurrent: int | None = _field(optional=True, default=None)
    sessions: int | None = _field(optional=True, default=None)


@dataclass(frozen=True, eq=False, repr=False)
class LocalRef(Record):
    """A file in the worker's store or data store."""

    type: ClassVar[Literal["Local"]] = "Local"
    path: str


@dataclass(frozen=True, eq=False, repr=False)
class S3Ref(Record):
    """An S3 object (kept for Soma 0.2.43 shapes; workers answer ``unsupported_reference``)."""

    type: ClassVar[Literal["S3"]] = "S3"
    bucket: str
    key: str
    region: str | None = None


@dataclass(frozen=True, eq=False, repr=False)
class CachedRef(Record):
    """A content-addressed store entry: ``cache_key`` is 64 hex (32 ints on v1)."""

    type: ClassVar[Literal["Cached"]] = "Cached"
    cache_key: str = _field("cache_key")
    size: int | None = _field(optional=True, only="v2", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class StreamRef(Record):
    """A stream endpoint (kept for Soma 0.2.43 shapes; unsupported as a plan input)."""

    type: ClassVar[Literal["Stream"]] = "Stream"
    endpoint: str
    format: str


@dataclass(frozen=True, eq=False, repr=False)
class InlineRef(Record):
    """A value carried inside the reference itself."""

    type: ClassVar[Literal["Inline"]] = "Inline"
    value: Any = _field("value", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class ZarrRef(Record):
    """A Zarr array (kept for Soma 0.2.43 shapes; workers answer ``unsupported_reference``)."""

    type: ClassVar[Literal["Zarr"]] = "Zarr"
    bucket: str
    array_path: str
    region: str | None = None


DataRef: TypeAlias = LocalRef | S3Ref | CachedRef | StreamRef | InlineRef | ZarrRef
DATA_REFS: dict[str, type[Record]] = {
    cls.type: cls for cls in (LocalRef, S3Ref, CachedRef, StreamRef, InlineRef, ZarrRef)
}


@dataclass(frozen=True, eq=False, repr=False)
class FitMode(Record):
    """``{"Fit": {"y", "batch_size"}}``: fit with labels ``y``, batched when ``batch_size`` is set."""

    y: Any = _field("value", default=None)
    batch_size: int | None = None


Mode: TypeAlias = Literal["Forward"] | FitMode


@dataclass(frozen=True, eq=False, repr=False)
class SerializedFilter(Record):
    """One filter of a plan: its pickle (never unpickled by the worker) and metadata."""

    node_id: str
    pickled_filter: bytes = _field("pickle")
    state: Any = _field("state", default=None)
    requirements: list[str] = field(default_factory=list)
    trainable: bool = False
    differentiable: bool = _field(only="v2", default=False)
    cacheable: bool = _field(only="v2", default=True)
    stream_mode: Literal["fixed", "evolving", "barrier"] = _field(only="v2", default="fixed")
    fit_key: str | None = _field(only="v2", default=None)
    out_key: str | None = _field(only="v2", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class SerializedPlan(Record):
    """One plan block (§5.2 v1 fields first, then the §5.6 v2 additions).

    ``plan`` is the api.md §7.2 dict form (``{"type": "Sequence", "steps": [...]}``);
    ``input`` a value, a ``DataRef`` or None; ``edges`` None means "not sent" (the
    Soma 0.2.43 dialect), which differs from an empty list.
    """

    plan_id: str
    plan: dict[str, Any] = _field("plan")
    input: Any = _field("input", default=None)
    filters: list[SerializedFilter] = field(default_factory=list)
    mode: Mode = _field("mode", default="Forward")
    metadata: Any = field(default_factory=dict)
    protocol_version: int | None = _field(optional=True, default=None)
    edges: list[tuple[str, str]] | None = _field(optional=True, default=None)
    seed: int | None = _field(optional=True, default=None)
    runtime: dict[str, Any] | None = _field(optional=True, default=None)
    timeout_s: float | None = _field(optional=True, default=None)
    run_id: str | None = _field(optional=True, only="v2", default=None)
    external: dict[str, Any] = _field("values", only="v2", factory=dict)
    outputs: list[str] = _field(only="v2", factory=list)
    composite_phase: Literal["fit", "grad", "all"] = _field(only="v2", default="fit")
    requirements: list[str] = _field(only="v2", factory=list)
    resources: dict[str, Any] | None = _field(optional=True, only="v2", default=None)
    session: dict[str, Any] | None = _field(optional=True, only="v2", default=None)
    session_id: str | None = _field(optional=True, only="v2", default=None)
    events: dict[str, Any] | None = _field(optional=True, only="v2", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class ErrorInfo(Record):
    """Why a plan failed (the v2 ``error`` map; v1 keeps ``message``, ``code`` and ``node_id``)."""

    code: str
    kind: str
    message: str
    node_id: str | None = None
    method: str | None = None
    python_type: str | None = None
    traceback: str | None = None


@dataclass(frozen=True, eq=False, repr=False)
class PlanSuccess(Record):
    """``status: "Success"``: the output (a value or a ``DataRef``) and the new states."""

    output: Any = _field("output", default=None)
    duration_ms: int = 0
    states: dict[str, Any] = _field("states", factory=dict)
    timings: dict[str, Any] | None = _field(optional=True, only="v2", default=None)
    metrics: dict[str, Any] = _field(only="v2", factory=dict)


@dataclass(frozen=True, eq=False, repr=False)
class PlanFailure(Record):
    """``status: "Failed"``: one typed error."""

    error: ErrorInfo
    duration_ms: int = 0


PlanOutcome: TypeAlias = PlanSuccess | PlanFailure


@dataclass(frozen=True, eq=False, repr=False)
class JobFile(Record):
    """One file of a Python job, ``path`` relative to the job directory."""

    path: str
    content: str


@dataclass(frozen=True, eq=False, repr=False)
class PythonPipelineJob(Record):
    """A script job (§6.10)."""

    job_id: str
    pipeline_id: str
    investigation_id: str
    files: list[JobFile]
    requirements: str
    entry_point: str
    input_data: Any = None
    params: Any = None
    timeout_s: float | None = _field(optional=True, default=None)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False, repr=False)
class Request(Record):
    """A client -> worker message; ``id`` correlates v2 replies (``re``)."""

    type: ClassVar[str] = ""
    id: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True, eq=False, repr=False)
class Reply(Record):
    """A worker -> client message; ``re`` is the ``id`` of the request it belongs to."""

    type: ClassVar[str] = ""
    re: str | None = field(default=None, kw_only=True)


@dataclass(frozen=True, eq=False, repr=False)
class Hello(Request):
    """First v2 frame; ``v`` is the envelope version the client speaks."""

    type: ClassVar[Literal["Hello"]] = "Hello"
    client: dict[str, Any] = field(default_factory=dict)
    v: int = WIRE_VERSION


@dataclass(frozen=True, eq=False, repr=False)
class AssignPlan(Request):
    """Run one plan block."""

    type: ClassVar[Literal["AssignPlan"]] = "AssignPlan"
    plan: SerializedPlan


@dataclass(frozen=True, eq=False, repr=False)
class CancelPlan(Request):
    """Cancel a plan, job, stream or session by id."""

    type: ClassVar[Literal["CancelPlan"]] = "CancelPlan"
    plan_id: str


@dataclass(frozen=True, eq=False, repr=False)
class StatusRequest(Request):
    """Ask for capabilities and load."""

    type: ClassVar[Literal["StatusRequest"]] = "StatusRequest"


@dataclass(frozen=True, eq=False, repr=False)
class Ping(Request):
    """Liveness probe, answered by ``Pong``."""

    type: ClassVar[Literal["Ping"]] = "Ping"


@dataclass(frozen=True, eq=False, repr=False)
class Shutdown(Request):
    """Ask the worker to drain and stop."""

    type: ClassVar[Literal["Shutdown"]] = "Shutdown"
    reason: str | None = _field(optional=True, default=None)
    drain_s: float | None = _field(optional=True, default=None)


@dataclass(frozen=True, eq=False, repr=False)
class Registered(Request):
    """A Soma 0.2.43 acknowledgement the worker ignores (v1 only)."""

    type: ClassVar[Literal["Registered"]] = "Registered"
    worker_id: str


@dataclass(frozen=True, eq=False, repr=False)
class GetState(Request):
    """Read the states of a session's nodes."""

    type: ClassVar[Literal["GetState"]] = "GetState"
    plan_id: str
    node_ids: list[str]


@dataclass(frozen=True, eq=False, repr=False)
class SetState(Request):
    """Replace the states of a session's nodes, in order."""

    type: ClassVar[Literal["SetState"]] = "SetState"
    plan_id: str
    states: dict[str, Any] = _field("states")


@dataclass(frozen=True, eq=False, repr=False)
class GetGradients(Request):
    """Read the gradients of a session's parameter owners."""

    type: ClassVar[Literal["GetGradients"]] = "GetGradients"
    plan_id: str
    node_ids: list[str]


@dataclass(frozen=True, eq=False, repr=False)
class ApplyGradients(Request):
    """Apply gradients ``{node_id: {param: array}}`` with an optional learning rate."""

    type: ClassVar[Literal["ApplyGradients"]] = "ApplyGradients"
    plan_id: str
    gradients: dict[str, Any] = _field("gradients")
    lr: float | dict[str, float] | None = _field(optional=True, default=None)


@dataclass(frozen=True, eq=False, repr=False)
class AssignPythonJob(Request):
    """Run a script job."""

    type: ClassVar[Literal["AssignPythonJob"]] = "AssignPythonJob"
    job: PythonPipelineJob


@dataclass(frozen=True, eq=False, repr=False)
class StreamBegin(Request):
    """Open a forward stream over a linear plan block."""

    type: ClassVar[Literal["StreamBegin"]] = "StreamBegin"
    stream_id: str
    plan_id: str
    total_chunks: int | None
    plan: SerializedPlan


PLAN_CARRIERS = (AssignPlan, StreamBegin)
"""The requests that carry a ``SerializedPlan`` (its id is checked as soon as they are decoded)."""


@dataclass(frozen=True, eq=False, repr=False)
class ChunkData(Request):
    """One chunk of a stream; ``chunk_index`` counts from 0."""

    type: ClassVar[Literal["ChunkData"]] = "ChunkData"
    stream_id: str
    chunk_index: int
    value: Any = _field("value", default=None)


@dataclass(frozen=True, eq=False, repr=False)
class StreamEnd(Request):
    """Close a stream and flush its barriers."""

    type: ClassVar[Literal["StreamEnd"]] = "StreamEnd"
    stream_id: str


@dataclass(frozen=True, eq=False, repr=False)
class Register(Reply):
    """The v1 status answer (also the body of ``/info``), with ``load`` when asked."""

    type: ClassVar[Literal["Register"]] = "Register"
    worker_id: str
    capabilities: Capabilities
    load: LoadMetrics | None = _field(optional=True, default=None)


@dataclass(frozen=True, eq=False, repr=False)
class Welcome(Reply):
    """The answer to ``Hello``."""

    type: ClassVar[Literal["Welcome"]] = "Welcome"
    worker_id: str
    protocols: list[int]
    capabilities: Capabilities
    runtime: dict[str, Any]
    max_concurrent: int
    inline_threshold: int
    max_message_bytes: int
    v: int = WIRE_VERSION


@dataclass(frozen=True, eq=False, repr=False)
class Status(Reply):
    """The v2 answer to ``StatusRequest``; ``running`` and ``sessions`` are counts."""

    type: ClassVar[Literal["Status"]] = "Status"
    worker_id: str
    capabilities: Capabilities
    load: LoadMetrics
    running: int = 0
    queue_depth: int = 0
    sessions: int = 0


@dataclass(frozen=True, eq=False, repr=False)
class PlanResult(Reply):
    """The terminal reply to ``AssignPlan``."""

    type: ClassVar[Literal["PlanResult"]] = "PlanResult"
    worker_id: str
    plan_id: str
    result: PlanOutcome = _field("result")


@dataclass(frozen=True, eq=False, repr=False)
class Event(Reply):
    """A live event (api.md §8 dict) of a running plan."""

    type: ClassVar[Literal["Event"]] = "Event"
    worker_id: str
    plan_id: str
    event: dict[str, Any]


@dataclass(frozen=True, eq=False, repr=False)
class JobProgress(Reply):
    """A job entered a phase (or printed a metrics line); never terminal."""

    type: ClassVar[Literal["JobProgress"]] = "JobProgress"
    worker_id: str
    job_id: str
    phase: str
    step: int
    total: int
    metrics: Any = None


@dataclass(frozen=True, eq=False, repr=False)
class JobResult(Reply):
    """The terminal reply to ``AssignPythonJob``."""

    type: ClassVar[Literal["JobResult"]] = "JobResult"
    worker_id: str
    job_id: str
    success: bool
    metrics: Any
    output: str
    duration_ms: int


@dataclass(frozen=True, eq=False, repr=False)
class StateResult(Reply):
    """The answer to ``GetState``."""

    type: ClassVar[Literal["StateResult"]] = "StateResult"
    worker_id: str
    plan_id: str
    states: dict[str, Any] = _field("states")


@dataclass(frozen=True, eq=False, repr=False)
class GradientsResult(Reply):
    """The answer to ``GetGradients``; ``missing`` lists nodes without gradients."""

    type: ClassVar[Literal["GradientsResult"]] = "GradientsResult"
    worker_id: str
    plan_id: str
    gradients: dict[str, Any] = _field("gradients")
    missing: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False, repr=False)
class ChunkResult(Reply):
    """The output of one chunk, or ``buffered`` when a barrier kept it."""

    type: ClassVar[Literal["ChunkResult"]] = "ChunkResult"
    stream_id: str
    chunk_index: int
    value: Any = _field("value", default=None)
    buffered: bool = False


@dataclass(frozen=True, eq=False, repr=False)
class StreamComplete(Reply):
    """The terminal reply to ``StreamEnd``: the flush result and the chunk count."""

    type: ClassVar[Literal["StreamComplete"]] = "StreamComplete"
    stream_id: str
    result: PlanOutcome = _field("result")
    chunks: int = 0


@dataclass(frozen=True, eq=False, repr=False)
class Heartbeat(Reply):
    """Sent while requests are in flight, so a silent worker can be told from a busy one."""

    type: ClassVar[Literal["Heartbeat"]] = "Heartbeat"
    worker_id: str
    load: LoadMetrics


@dataclass(frozen=True, eq=False, repr=False)
class Ack(Reply):
    """A plain success answer."""

    type: ClassVar[Literal["Ack"]] = "Ack"
    worker_id: str
    plan_id: str | None = _field(optional=True, default=None)


@dataclass(frozen=True, eq=False, repr=False)
class Pong(Reply):
    """The answer to ``Ping``."""

    type: ClassVar[Literal["Pong"]] = "Pong"


@dataclass(frozen=True, eq=False, repr=False)
class ShutdownAck(Reply):
    """The v1 answer to ``Shutdown``."""

    type: ClassVar[Literal["ShutdownAck"]] = "ShutdownAck"


@dataclass(frozen=True, eq=False, repr=False)
class Error(Reply):
    """A typed failure; build it with :func:`make_error` so kind and retryable match the code."""

    type: ClassVar[Literal["Error"]] = "Error"
    worker_id: str = field(default="", kw_only=True)
    code: str
    kind: str
    message: str
    retryable: bool
    plan_id: str | None = _field(optional=True, default=None)
    details: dict[str, Any] | None = _field(optional=True, default=None)
    stream_id: str | None = _field(optional=True, default=None)
    chunk_index: int | None = _field(optional=True, default=None)


Message: TypeAlias = Request | Reply

CLIENT_MESSAGES: dict[str, type[Request]] = {
    cls.type: cls
    for cls in (
        Hello,
        AssignPlan,
        CancelPlan,
        StatusRequest,
        Ping,
        Shutdown,
        Registered,
        GetState,
        SetState,
        GetGradients,
        ApplyGradients,
        AssignPythonJob,
        StreamBegin,
        ChunkData,
        StreamEnd,
    )
}
WORKER_MESSAGES: dict[str, type[Reply]] = {
    cls.type: cls
    for cls in (
        Register,
        Welcome,
        Status,
        PlanResult,
        Event,
        JobProgress,
        JobResult,
        StateResult,
        GradientsResult,
        ChunkResult,
        StreamComplete,
        Heartbeat,
        Ack,
        Pong,
        ShutdownAck,
        Error,
    )
}
MESSAGE_TYPES: dict[str, type[Request] | type[Reply]] = {**CLIENT_MESSAGES, **WORKER_MESSAGES}
#: Types each dialect knows; anything else is ``bad_message`` there.
V1_MESSAGES = frozenset(MESSAGE_TYPES) - {"Hello", "Welcome", "Status"}
V2_MESSAGES = frozenset(MESSAGE_TYPES) - {"Registered", "ShutdownAck"}
#: The v1 stream sub-protocol (§6.9), which travels in binary msgpack frames.
STREAM_MESSAGES = frozenset({"StreamBegin", "ChunkData", "StreamEnd", "ChunkResult", "StreamComplete"})


def make_error(code: str, message: str, **fields: Any) -> Error:
    """Build an ``Error`` whose ``kind`` and ``retryable`` come from the §5.8 table.

    Raises ``ValueError`` for a code outside the table (a programming error).
    """
    try:
        kind, retryable = ERROR_CODES[code]
    except KeyError:
        raise ValueError(f"unknown wire error code {code!r}; see ERROR_CODES") from None
    return Error(code=code, kind=kind, message=message, retryable=retryable, **fields)


def error_reply(exc: WireError, *, worker_id: str = "") -> Error:
    """The ``Error`` answering a frame that raised ``exc``, correlated as far as it can be."""
    return make_error(
        exc.code,
        exc.message,
        worker_id=worker_id,
        plan_id=exc.plan_id,
        details=exc.details or None,
        re=exc.request_id,
    )


# --------------------------------------------------------------------------- plans


def validate_plan(plan: Any, path: str = "plan") -> dict[str, Any]:
    """Check an api.md §7.2 plan dict and return a normalised copy.

    Raises ``WireError("bad_plan")`` naming the offending place.
    """
    if not isinstance(plan, dict):
        raise WireError("bad_plan", f"{path}: expected a plan map, got {_type_name(plan)}")
    kind = plan.get("type")

    def text(key: str) -> str:
        value = plan.get(key)
        if not isinstance(value, str):
            raise WireError("bad_plan", f"{path}.{key}: expected str, got {_type_name(value)}")
        return value

    def plans(key: str) -> list[dict[str, Any]]:
        items = plan.get(key)
        if not isinstance(items, list):
            raise WireError("bad_plan", f"{path}.{key}: expected a list of plans")
        return [validate_plan(item, f"{path}.{key}[{i}]") for i, item in enumerate(items)]

    match kind:
        case "Empty":
            return {"type": "Empty"}
        case "Execute":
            return {"type": "Execute", "node_id": text("node_id")}
        case "Cached":
            key = text("key")
            if not re.fullmatch(_HEX64, key):
                raise WireError("bad_plan", f"{path}.key: expected 64 lowercase hex digits")
            return {"type": "Cached", "node_id": text("node_id"), "key": key}
        case "Composite":
            ids = plan.get("node_ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise WireError("bad_plan", f"{path}.node_ids: expected a list of node ids")
            return {"type": "Composite", "node_ids": list(ids)}
        case "Sequence":
            return {"type": "Sequence", "steps": plans("steps")}
        case "Parallel":
            return {"type": "Parallel", "branches": plans("branches")}
        case "Remote":
            inner = validate_plan(plan.get("plan"), f"{path}.plan")
            return {"type": "Remote", "node_id": text("node_id"), "target": text("target"), "plan": inner}
        case "Loop":
            limit = plan.get("max_iterations")
            if limit is not None and (type(limit) is not int or limit < 0):
                raise WireError("bad_plan", f"{path}.max_iterations: expected a count or null")
            body = validate_plan(plan.get("body"), f"{path}.body")
            return {"type": "Loop", "node_id": text("node_id"), "body": body, "max_iterations": limit}
        case "Branch":
            arms = plan.get("arms")
            if not isinstance(arms, list):
                raise WireError("bad_plan", f"{path}.arms: expected a list of [label, plan]")
            checked = []
            for i, arm in enumerate(arms):
                if not (isinstance(arm, list | tuple) and len(arm) == 2 and isinstance(arm[0], str)):
                    raise WireError("bad_plan", f"{path}.arms[{i}]: expected [label, plan]")
                checked.append([arm[0], validate_plan(arm[1], f"{path}.arms[{i}][1]")])
            return {"type": "Branch", "node_id": text("node_id"), "arms": checked}
    raise WireError("bad_plan", f"{path}.type: unknown plan variant {kind!r}")


def version_refusal(peer: Any, *, side: Literal["worker", "client"] = "worker") -> WireError:
    """The ``protocol_mismatch`` refusal of a peer speaking version ``peer`` (None: unversioned).

    ``older`` names the side that must upgrade; from the worker's side a peer below
    ``WIRE_VERSION`` (or unversioned) is an older client, one above it means the worker is older.
    """
    newer_peer = type(peer) is int and peer > WIRE_VERSION
    if side == "worker":
        older = "worker" if newer_peer else "client"
    else:
        older = "client" if newer_peer else "worker"
    return WireError(
        "protocol_mismatch",
        f"protocol version {peer!r} is not supported: this {side} speaks {list(PROTOCOLS)} "
        f"(binary frames: {WIRE_VERSION}); the {older} is older and must be upgraded",
        details={"worker": list(PROTOCOLS), "peer": peer, "older": older},
    )


def check_plan_id(plan_id: str, path: str = "plan.plan_id") -> None:
    """Refuse a v2 plan id outside ``[A-Za-z0-9._:-]{1,128}`` (§5.6) with ``bad_plan``."""
    if not re.fullmatch(_PLAN_ID, plan_id):
        raise WireError("bad_plan", f"{path}: {plan_id!r} is not a valid plan id ([A-Za-z0-9._:-]{{1,128}})")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
