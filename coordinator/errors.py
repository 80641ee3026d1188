"""What the domain raises when it will not serve a request; the servicers map each to a status.

Each class is one kind of answer a client acts on differently (fix the request, look elsewhere,
retry later, resume, ask for another token). The message is the sentence the caller sees, so
it says what was wrong and what to do. Nothing here knows gRPC: ``coordinator.gateway.servicers`` holds
the one table from these classes to status codes.

A refusal that is a normal outcome (an adapter that fails its checks) is not an error: it is
the ``Accepted`` answer with the reason.
"""

from __future__ import annotations


class RequestError(Exception):
    """The request cannot be served; ``str()`` is the sentence for the caller."""


class InvalidRequest(RequestError):
    """The request itself is wrong (a malformed stream, a bad dataset, a value out of range)."""


class NotFound(RequestError):
    """The job, version or token the request names does not exist."""


class WrongState(RequestError):
    """The request does not fit the state it meets: a stale lease, a resume from past what is
    held, a rollback the history does not allow. Another request may succeed."""


class NotPermitted(RequestError):
    """The caller's token may not do this (another token's lease)."""


class LimitReached(RequestError):
    """The caller has used up what it may have (workers per token), or the server is as busy as it
    takes; ``retry_after_s`` (when set) is how soon trying again is worth it."""

    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Incomplete(RequestError):
    """What arrived is short of or differs from what was announced; the caller resends."""


class BrokenOff(RequestError):
    """The caller went away mid-stream; what arrived is kept for a resume."""


class Unavailable(RequestError):
    """The coordinator cannot serve this now (its ledger is failing over); the caller retries."""


class Unauthenticated(RequestError):
    """The caller's token is unknown or was revoked."""
