"""How a plan or session message fails once it has passed validation.

``Failed`` carries the ``ErrorInfo`` of a failed ``PlanResult`` (or the code and message of a
v2 ``Error``) up from wherever the failure is found; ``error_info`` builds that info from a wire
code, and ``wire_code`` maps a child's failure onto the codes the wire allows.
"""

from __future__ import annotations

from typing import Any

from soma.isolation.failures import ChildFailure
from soma.wire.messages import ERROR_CODES, ErrorInfo

__all__ = ["Failed", "error_info", "wire_code"]


class Failed(Exception):
    """A plan failed while executing; ``info`` is its ``PlanResult`` error."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


def error_info(code: str, message: str, **fields: Any) -> ErrorInfo:
    """The ``ErrorInfo`` for ``code`` (``internal`` when the wire does not know it), kind filled in."""
    if code not in ERROR_CODES:
        code = "internal"
    return ErrorInfo(code=code, kind=ERROR_CODES[code][0], message=message, **fields)


def wire_code(failure: ChildFailure) -> str:
    """A child failure's wire code: the parent's own protocol slips are ``internal`` (§5.8)."""
    code = failure.code
    if code in ("bad_request", "unknown_command") or code not in ERROR_CODES:
        return "internal"
    return code
