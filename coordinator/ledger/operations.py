"""History operations (rollback, unmerge) handed from the gateway that received them to the folder.

An admin's rollback or unmerge may reach any gateway, but only the folding leader may change the
model's history: it alone holds the running model that folds, and its fence is checked where it
publishes (coordinator.ledger.leaders). So a gateway queues the request here (:meth:`ask`), the
leader takes requests between folds (:meth:`take`) and answers on the request's own list
(:meth:`tell`: "started" when it takes it, then the outcome), and the gateway waits there
(:meth:`hear`). A request carries the time the gateway stops waiting; the leader drops one past it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import redis

from coordinator.ledger import keys

ANSWER_TTL_S = 3600  # an answer nobody reads (its gateway went away) is gone after this

ROLLBACK = "rollback"
UNMERGE = "unmerge"


@dataclass(frozen=True)
class Request:
    id: str
    kind: str  # ROLLBACK (arg: the version) or UNMERGE (arg: the adapter id)
    arg: str
    deadline: float  # unix seconds: the asking gateway stops waiting then

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Operations:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def ask(self, kind: str, arg: str, deadline: float) -> Request:
        """Queue a request for the folding leader."""
        request = Request(secrets.token_hex(8), kind, str(arg), deadline)
        self.r.lpush(keys.OPERATIONS, request.to_json())
        return request

    def withdraw(self, request: Request) -> bool:
        """Take a request back before the leader takes it; False when the leader has taken it."""
        return bool(self.r.lrem(keys.OPERATIONS, 1, request.to_json()))

    def take(self) -> Request | None:
        """The oldest waiting request, taken off the queue (None: none waits)."""
        raw = self.r.rpop(keys.OPERATIONS)
        return Request(**json.loads(raw)) if raw else None

    def tell(self, request_id: str, answer: dict[str, Any]) -> None:
        key = keys.operation_answer(request_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(key, json.dumps(answer))
        pipe.expire(key, ANSWER_TTL_S)
        pipe.execute()

    def hear(self, request_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The request's next answer, waiting up to ``timeout_s`` (None: none came)."""
        popped = self.r.blpop([keys.operation_answer(request_id)], timeout=max(timeout_s, 0.01))
        return json.loads(popped[1]) if popped else None

    def waiting(self) -> int:
        return int(self.r.llen(keys.OPERATIONS))
