"""Upload: get a finished adapter to the coordinator, resuming broken streams, until it answers.

Uploads are idempotent per (task, fence, sha256) on the coordinator's side, so resending after a
broken connection is always safe: a copy that already arrived is answered "accepted" again. Each
try first asks where the bytes go (``UploadTarget``): with an object store, a presigned PUT for
this lease's upload object, after which the Upload call carries the manifest alone and the
coordinator reads the object back and checks it. Otherwise it asks how many bytes the
coordinator kept from an earlier, broken-off try (``UploadOffset``) and streams only the rest;
the coordinator checks the whole file's sha256.
A refusal (stale lease, failed check) is final and is not retried; so is a refusal of the token
itself (it may not upload, or it is unknown or was revoked: a banned volunteer), which waiting
does not change. Anything else (the coordinator away or restarting, a resume to make) is retried
for the upload's patience.

A finished adapter is also written to the worker's outbox (a folder in its cache dir) before it
is sent, and removed once the coordinator has answered. If the process running the task dies
first (its Ray node went down with a restarted coordinator's head, say), the worker agent finds
the entry and delivers it: work that was done is not thrown away. An entry names the model
lineage its adapter was trained in (the manifest's ``lineage``) and goes only to a coordinator of
that lineage: a volunteer who serves two coordinators never hands one the other's work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from nomoat import direct
from nomoat.client import Busy, CoordinatorClient, NomoatError
from nomoat.logs import fields
from nomoat.spec import GradientNorms
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.uploader")
# What the coordinator answers when no retry can help: the token may not upload (another role,
# another token's worker), or it is unknown or revoked (a ban). Every other error may pass.
REFUSED_FOR_GOOD = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
Pace = Callable[[int], object]  # called with a chunk's size before it is sent


@dataclass(frozen=True)
class UploadResult:
    accepted: bool
    adapter_id: str
    reason: str
    attempts: int


def manifest_for(task_id: str, fence: int, base_version: int, rank: int, alpha: float, tokens: int,
                 train_loss: float, data: bytes, worker_id: str = "", lineage: str = "",
                 norms: GradientNorms | None = None, lease_secret: str = "") -> pb.AdapterManifest:
    norms = norms or GradientNorms()
    return pb.AdapterManifest(
        task_id=task_id, fence=fence, base_version=base_version, rank=rank, alpha=alpha, tokens=tokens,
        train_loss=train_loss, sha256=hashlib.sha256(data).hexdigest(), size=len(data), worker_id=worker_id,
        lineage=lineage, grad_micro_sq=norms.micro_sq, grad_batch_sq=norms.batch_sq,
        grad_micro_batch=norms.micro_batch, grad_batch_size=norms.batch_size, lease_secret=lease_secret,
    )


def send_once(client: CoordinatorClient, manifest: pb.AdapterManifest, data: bytes, attempt: int = 1,
              pace: Pace | None = None) -> UploadResult:
    """One try: ask what the coordinator holds, send the rest. NomoatError when it did not answer.
    ``pace(n)`` waits before each chunk of n bytes (``Controls.throttle_upload``: --max-upload-mbps)."""
    url = client.upload_target(manifest)
    if url:
        try:
            direct.put(url, data, pace=pace)
        except direct.DirectError as exc:
            raise NomoatError(str(exc)) from None
        stored = pb.AdapterManifest()
        stored.CopyFrom(manifest)
        stored.in_store = True
        reply = client.upload(stored, b"")
        return UploadResult(reply.accepted, reply.adapter_id, reply.reason, attempt)
    held = client.upload_offset(manifest.task_id, manifest.fence, manifest.sha256, manifest.worker_id,
                                manifest.lease_secret)
    offset = held if 0 <= held <= len(data) else 0
    if offset:
        log.info("resuming the upload of %s at byte %d of %d", manifest.task_id, offset, len(data))
    reply = client.upload(manifest, data, offset=offset, pace=pace)
    return UploadResult(reply.accepted, reply.adapter_id, reply.reason, attempt)


def upload(client: CoordinatorClient, manifest: pb.AdapterManifest, data: bytes,
           patience_s: float = 600.0, backoff_s: float = 1.0, max_backoff_s: float = 5.0,
           pace: Pace | None = None) -> UploadResult:
    """Send until the coordinator answers; a coordinator being restarted is waited for ``patience_s``.
    A refusal of the worker's token ends it at once, as a refused result saying so.

    A coordinator receiving as many uploads as it takes (Busy: a thousand volunteers finished a
    unit in the same second) is no failure: the upload waits the time it names, jittered so the
    waiting volunteers do not all come back at once, and counts no attempt."""
    deadline = time.monotonic() + patience_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return send_once(client, manifest, data, attempt, pace=pace)
        except Busy as exc:
            attempt -= 1
            delay = exc.retry_after_s * random.uniform(0.5, 1.5)
            if time.monotonic() + delay > deadline:
                raise
            log.info("the coordinator is receiving as many uploads as it takes; sending %s again in %.1f s",
                     manifest.task_id, delay)
            time.sleep(delay)
        except NomoatError as exc:
            if exc.code in REFUSED_FOR_GOOD:
                log.error("the coordinator refused the upload of task %s for good (%s); it is not retried: ask "
                          "the operator about this worker's token", manifest.task_id, exc,
                          extra=fields("upload.refused", task=manifest.task_id, fence=manifest.fence,
                                       reason=str(exc)))
                return UploadResult(False, "", str(exc), attempt)
            delay = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("upload of %s failed (%s); retrying in %.0f s", manifest.task_id, exc, delay)
            time.sleep(delay)


# -- the outbox -------------------------------------------------------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Entry:
    key: str
    manifest: pb.AdapterManifest
    data: bytes
    age_s: float


class Outbox:
    """Finished adapters not yet answered by the coordinator:
    ``<lineage>.<task>-<fence>.{adapter,manifest,owner}``.

    The ``.owner`` file holds the pid of the process sending it; an entry whose owner is gone
    (or gave it up) is an orphan, for the worker agent to deliver.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _key(self, manifest: pb.AdapterManifest) -> str:
        # The lineage is part of the name: two coordinators may both have a task "t-1" at fence 1.
        lineage = _SAFE.sub("_", manifest.lineage)[:64] + "." if manifest.lineage else ""
        return lineage + _SAFE.sub("_", manifest.task_id)[:128] + f"-{manifest.fence}"

    def put(self, manifest: pb.AdapterManifest, data: bytes) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        key = self._key(manifest)
        (self.root / f"{key}.owner").write_text(str(os.getpid()))
        (self.root / f"{key}.adapter").write_bytes(data)
        tmp = self.root / f"{key}.manifest.tmp"
        tmp.write_bytes(manifest.SerializeToString())
        tmp.replace(self.root / f"{key}.manifest")  # last: an entry with a manifest is complete
        return key

    def give_up(self, key: str) -> None:
        """The owner stops trying (it ran out of patience); the agent takes over."""
        (self.root / f"{key}.owner").unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        for suffix in (".manifest", ".adapter", ".owner"):
            (self.root / f"{key}{suffix}").unlink(missing_ok=True)

    def orphans(self) -> list[Entry]:
        found = []
        for path in sorted(self.root.glob("*.manifest")) if self.root.exists() else ():
            key = path.name[: -len(".manifest")]
            try:
                owner = int((self.root / f"{key}.owner").read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                continue
            try:
                manifest = pb.AdapterManifest.FromString(path.read_bytes())
                data = (self.root / f"{key}.adapter").read_bytes()
                age = time.time() - path.stat().st_mtime
            except Exception:  # noqa: BLE001  (a damaged entry is worth nothing: drop it)
                self.remove(key)
                continue
            found.append(Entry(key, manifest, data, age))
        return found


def deliver_orphans(client: CoordinatorClient, outbox: Outbox, lineage: str, max_age_s: float = 24 * 3600) -> int:
    """One try for each orphaned entry of ``lineage`` (the coordinator's, as it said when the
    worker registered); returns how many the coordinator answered."""
    answered = 0
    for entry in outbox.orphans():
        if entry.age_s > max_age_s:
            outbox.remove(entry.key)
            continue
        if not lineage or entry.manifest.lineage != lineage:
            continue  # another coordinator's work (or one from before lineages): it stays until too old
        try:
            result = send_once(client, entry.manifest, entry.data)
        except NomoatError as exc:
            log.info("the adapter of %s is still waiting for the coordinator (%s)", entry.manifest.task_id, exc)
            continue
        outbox.remove(entry.key)
        answered += 1
        if result.accepted:
            log.warning("delivered the adapter of %s (fence %d) left by a stopped task: %s",
                        entry.manifest.task_id, entry.manifest.fence, result.adapter_id)
        else:
            log.warning("the adapter of %s left by a stopped task was refused: %s",
                        entry.manifest.task_id, result.reason)
    return answered
