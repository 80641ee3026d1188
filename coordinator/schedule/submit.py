"""Submit: a dataset file becomes a job of training tasks.

All-or-nothing: every record is validated before anything is stored, so a bad line leaves no
trace. A random slice of the records (seeded by the dataset's hash, so resubmitting gives the
same split) is held back for evaluation; the rest is cut into contiguous tasks of about
``tokens_per_task`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from coordinator.errors import Incomplete, InvalidRequest
from coordinator.ledger import (  # JobConfig: still importable from here
    JobConfig,
    JobRecord,
    Ledger,
    TaskRecord,
    new_task_id,
)
from coordinator.settings import JobDefaults, Settings
from coordinator.model.store import BlobStore
from nomoat.logs import fields
from coordinator.ledger import quotas
from coordinator.schedule import shards
from nomoat.records import DatasetError, parse_dataset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("nomoat.submit")


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    tasks: int
    records: int
    tokens: int
    validation_records: int


_LIMITS = {
    "lora_rank": (1, 1024),
    "lora_alpha": (1e-3, 1e4),
    "seq_len": (8, 32768),
    "learning_rate": (1e-7, 1.0),
    "batch_size": (1, 4096),
    "epochs": (1, 100),
    "tokens_per_task": (64, 1 << 34),
}


def resolve_config(requested: dict[str, Any], defaults: JobDefaults, modules: Sequence[str]) -> JobConfig:
    """Fill unset (zero or empty) fields from the defaults and check every value's range."""
    merged: dict[str, Any] = {}
    for key, default in asdict(defaults).items():
        value = requested.get(key)
        merged[key] = value if value else default
    merged["target_modules"] = tuple(merged["target_modules"])
    for key, (low, high) in _LIMITS.items():
        if not low <= merged[key] <= high:
            raise DatasetError(f"{key} = {merged[key]} is out of range; it must lie in [{low}, {high}]")
    names = {m.rsplit(".", 1)[-1] for m in modules}
    unknown = sorted(set(merged["target_modules"]) - names)
    if unknown:
        raise DatasetError(
            f"target modules {', '.join(unknown)} are not linear layers of the base model "
            f"(it has: {', '.join(sorted(names))})"
        )
    return JobConfig(**merged)


def split_tasks(token_counts: Sequence[int], tokens_per_task: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) record ranges of about ``tokens_per_task`` tokens each."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, count in enumerate(token_counts):
        total += count
        if total >= tokens_per_task:
            ranges.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(token_counts):
        if ranges and total < tokens_per_task // 2:
            ranges[-1] = (ranges[-1][0], len(token_counts))  # a small tail joins the last task
        else:
            ranges.append((start, len(token_counts)))
    return ranges


def records_lines(texts: Sequence[str]) -> list[bytes]:
    return [(json.dumps({"text": t}, ensure_ascii=False) + "\n").encode("utf-8") for t in texts]


def task_ids(job_id: str, n: int) -> list[str]:
    """``n`` distinct task ids for a job (coordinator.ledger.new_task_id): a task's id says
    nothing of its place in the job, and a replica run's, made the same way, nothing of what it is."""
    ids: list[str] = []
    while len(ids) < n:
        ids = list(dict.fromkeys(ids + [new_task_id(job_id) for _ in range(n - len(ids))]))
    return ids


def records_blob(texts: Sequence[str]) -> bytes:
    return b"".join(records_lines(texts))


def read_records(data: bytes, start: int = 0, end: int | None = None) -> list[str]:
    # Split on b"\n" only: str.splitlines() also breaks at U+2028, U+2029 and U+0085, which
    # json.dumps(ensure_ascii=False) leaves inside a record.
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [json.loads(line)["text"] for line in lines[start:end]]


@dataclass(frozen=True)
class DatasetHeader:
    """The first part of a streamed dataset: what it is and how many bytes follow."""

    filename: str
    name: str
    size: int
    requested: dict[str, Any]  # the job config asked for; zero or empty fields take the defaults


@dataclass(frozen=True)
class DatasetDigest:
    """The last part of a streamed dataset: the sha256 of all its bytes."""

    sha256: str


DatasetPart = DatasetHeader | bytes | DatasetDigest


def receive(
    settings: Settings,
    ledger: Ledger,
    store: BlobStore,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    parts: Iterable[DatasetPart],
    owner: str | None = None,
) -> SubmitResult:
    """Assemble a streamed dataset (header, bytes, digest), check it arrived whole, and submit it.

    The size is checked as the bytes arrive, so an oversized stream is refused before it is
    held in memory. Raises InvalidRequest for a malformed stream or dataset, Incomplete when
    the bytes do not add up to the header's size and sha256; nothing is stored then. With an
    ``owner`` (coordinator.gateway.quotas.owner_of), the job counts against its share
    (coordinator.ledger.quotas): a submit past it raises LimitReached, at the header when it
    can already tell.
    """
    limit = settings.max_dataset_bytes
    header, chunks, received, digest, claimed = None, [], 0, hashlib.sha256(), None
    for part in parts:
        if header is None and not isinstance(part, DatasetHeader):
            raise InvalidRequest("the first message must be the header")
        if isinstance(part, DatasetHeader):
            if header is not None:
                raise InvalidRequest("the header was sent twice")
            header = part
            if header.size > limit:
                raise InvalidRequest(f"the dataset is {header.size} bytes; this coordinator accepts at most {limit}")
            quotas.check_submit(ledger, settings, owner, header.size)
        elif isinstance(part, bytes):
            received += len(part)
            if received > min(limit, header.size):
                raise InvalidRequest("more data arrived than the header announced")
            digest.update(part)
            chunks.append(part)
        else:
            claimed = part.sha256
    if header is None:
        raise InvalidRequest("no dataset was sent")
    if received != header.size or claimed != digest.hexdigest():
        raise Incomplete("the dataset arrived incomplete or damaged (size or sha256 mismatch); nothing was stored")
    try:
        return submit(settings, ledger, store, tokenizer, modules, b"".join(chunks), header.filename, header.name,
                      header.requested, owner)
    except DatasetError as exc:
        raise InvalidRequest(f"{header.filename}: {exc}") from None


def submit(
    settings: Settings,
    ledger: Ledger,
    store: BlobStore,
    tokenizer: PreTrainedTokenizerBase,
    modules: Sequence[str],
    data: bytes,
    filename: str,
    name: str,
    requested: dict[str, Any],
    owner: str | None = None,
) -> SubmitResult:
    if len(data) > settings.max_dataset_bytes:
        raise DatasetError(
            f"the dataset is {len(data)} bytes; this coordinator accepts at most {settings.max_dataset_bytes}"
        )
    config = resolve_config(requested, settings.job, modules)
    texts = parse_dataset(data, filename)
    if len(texts) < 2:
        raise DatasetError("a dataset needs at least 2 records: one to train on and one to evaluate")

    digest = hashlib.sha256(data).hexdigest()
    order = list(range(len(texts)))
    random.Random(digest).shuffle(order)
    n_val = round(len(texts) * settings.validation_fraction)
    n_val = max(1, min(n_val, settings.max_validation_records, len(texts) - 1))
    records = [texts[i] for i in order]
    # Count exactly as the trainer packs (nomoat.packing.pack): "<|eos|>" inside a text is data,
    # and every text is followed by one eos token.
    encoded = tokenizer(records[n_val:], add_special_tokens=False, split_special_tokens=True, verbose=False)
    counts = [len(ids) + 1 for ids in encoded["input_ids"]]
    ranges = split_tasks(counts, config.tokens_per_task)

    job_id = "j-" + secrets.token_hex(4)
    quotas.reserve_submit(ledger, settings, owner, job_id, len(ranges), len(data))  # before anything is stored
    try:
        dataset_sha = store.put(data)
        lines = records_lines(records)
        records_sha = store.put(b"".join(lines))
        index_sha = store.put(shards.index_of(lines))  # a task's shard is read by byte range
        ids = task_ids(job_id, len(ranges))
        tasks = [
            TaskRecord(task_id=ids[i], job=job_id, index=i, start=n_val + s, end=n_val + e,
                       tokens=sum(counts[s:e]) * config.epochs)
            for i, (s, e) in enumerate(ranges)
        ]
        ledger.jobs.create(
            JobRecord(job_id=job_id, name=name or filename, config=config, dataset=dataset_sha, records=records_sha,
                      n_records=len(records), n_validation=n_val, tokens=sum(counts) * config.epochs,
                      total_tasks=len(tasks)),
            tasks,
            records_index=index_sha,
        )
    except BaseException:
        quotas.release_submit(ledger, owner, job_id, len(data))  # not recorded: not counted
        raise
    result = SubmitResult(job_id, len(tasks), len(records), sum(counts) * config.epochs, n_val)
    log.info("job %s submitted: %d records, %d tokens, %d tasks (%d records held out)", job_id, result.records,
             result.tokens, result.tasks, n_val, extra=fields("job.submitted", job=job_id, name=name,
                                                             records=result.records, tokens=result.tokens,
                                                             tasks=result.tasks, held_out=n_val))
    return result
