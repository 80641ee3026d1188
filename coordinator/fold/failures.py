"""What the folder does after a fold raised an error nobody planned for: pure bookkeeping.

A refused adapter (a gate, a format error) is an answer, not a failure. An unexpected error (a
bug, a blob that breaks the evaluation) would otherwise repeat every tick with the same adapter
first in the buffer. So: the fold's adapters are suspects; each next try folds one suspect alone
(one that folds is cleared, the next tried); a suspect that fails alone ``park_after`` times is
the one to set aside (the caller refuses it, with the reason); and each failure doubles the wait
before the next try, up to ``max_backoff_s``. Errors that are no adapter's (Redis away, another
folder leads or published first) are not counted here at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.ledger import AdapterRecord


@dataclass
class FoldFailures:
    tick_s: float
    park_after: int = 3
    max_backoff_s: float = 60.0
    _counts: dict[str, int] = field(default_factory=dict)  # adapter id -> failed folds in a row
    _retry_at: float = 0.0
    _backoffs: int = 0

    def waiting(self, now: float) -> bool:
        """Whether the folder is backing off after a failure (``now``: a monotonic clock)."""
        return now < self._retry_at

    def batch(self, buffered: Sequence[AdapterRecord], take: int) -> list[AdapterRecord]:
        """What to fold next: the first suspect alone while there are suspects, else ``take``."""
        suspects = [a for a in buffered if self._counts.get(a.adapter_id)]
        return suspects[:1] or list(buffered[:take])

    def failed(self, batch: Sequence[AdapterRecord], now: float) -> AdapterRecord | None:
        """Count a failed fold of ``batch``; returns the adapter to park, if one has earned it."""
        self._backoffs += 1
        self._retry_at = now + min(self.max_backoff_s, self.tick_s * 2 ** self._backoffs)
        for entry in batch:
            self._counts[entry.adapter_id] = self._counts.get(entry.adapter_id, 0) + 1
        if len(batch) == 1 and self._counts[batch[0].adapter_id] >= self.park_after:
            self._counts.pop(batch[0].adapter_id)
            self._retry_at, self._backoffs = 0.0, 0  # the culprit is out: the rest may fold at once
            return batch[0]
        return None

    def succeeded(self, batch: Sequence[AdapterRecord]) -> None:
        for entry in batch:
            self._counts.pop(entry.adapter_id, None)
        self._retry_at, self._backoffs = 0.0, 0
