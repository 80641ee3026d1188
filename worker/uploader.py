"""Upload: stream an adapter and its manifest to the coordinator, retrying what can be retried.

Uploads are idempotent per (task, fence, sha256) on the coordinator's side, so resending after a
broken connection is always safe: a copy that already arrived is answered "accepted" again.
A refusal (stale lease, failed check) is final and is not retried.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass

from nomoat.client import CoordinatorClient, NomoatError
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.uploader")


@dataclass(frozen=True)
class UploadResult:
    accepted: bool
    adapter_id: str
    reason: str
    attempts: int


def manifest_for(task_id: str, fence: int, base_version: int, rank: int, alpha: float, tokens: int,
                 train_loss: float, data: bytes, worker_id: str = "") -> pb.AdapterManifest:
    return pb.AdapterManifest(
        task_id=task_id, fence=fence, base_version=base_version, rank=rank, alpha=alpha, tokens=tokens,
        train_loss=train_loss, sha256=hashlib.sha256(data).hexdigest(), size=len(data), worker_id=worker_id,
    )


def upload(client: CoordinatorClient, manifest: pb.AdapterManifest, data: bytes,
           attempts: int = 6, backoff_s: float = 1.0) -> UploadResult:
    for attempt in range(1, attempts + 1):
        try:
            reply = client.upload(manifest, data)
            return UploadResult(reply.accepted, reply.adapter_id, reply.reason, attempt)
        except NomoatError as exc:
            if attempt == attempts:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("upload of %s failed (%s); retrying in %.0f s", manifest.task_id, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
