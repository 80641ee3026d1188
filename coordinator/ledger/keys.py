"""Every Redis key the ledger uses, in one place.

Redis holds state, never blobs: ids, counters, small JSON documents, and content hashes that
point into the blob store.
"""

PREFIX = "nomoat:"

JOBS = PREFIX + "jobs"  # zset: job id -> created (unix seconds)
RUNNING_JOBS = PREFIX + "jobs:running"  # zset: the jobs in state "running" -> created
PENDING = PREFIX + "tasks:pending"  # zset: task id -> enqueue time (FIFO order for dispatch)
LEASES = PREFIX + "tasks:leases"  # zset: task id -> lease deadline (unix seconds)
FENCE = PREFIX + "fence"  # counter: fencing tokens, strictly increasing across all tasks
FOLD_BUFFER = PREFIX + "fold:buffer"  # list: accepted adapter ids waiting to be folded
VERSIONS = PREFIX + "versions"  # zset: version number -> version number
LATEST = PREFIX + "versions:latest"  # string: newest published version number
WORKERS = PREFIX + "workers"  # zset: worker id -> last seen
RECENT_NORMS = PREFIX + "fold:norms"  # list: ‖ΔW‖ of recently accepted adapters (norm gate)
LINEAGE = PREFIX + "lineage"  # string: JSON of the model lineage version 0 fixed (id, base file hashes)
TOKENS = PREFIX + "tokens"  # hash: sha256(token) -> JSON {"role", "name", "created"}
REVOKED = PREFIX + "tokens:revoked"  # set: token ids revoked (a data-dir token is not revived)
REPLICATED = PREFIX + "replicated"  # zset: task id of each replicated task not yet settled -> opened
# hash: counter name -> count, what happened since the ledger began (coordinator.ledger.counters;
# the lease scripts in coordinator.ledger.leases add to "leases", "reissues", "leases_expired")
COUNTERS = PREFIX + "counters"
REFUSALS = PREFIX + "refusals:recent"  # list: JSON of the newest refusals (uploads, fold gates), newest first


def job(job_id: str) -> str:
    """Hash: name, state, dataset, records blob, config JSON, counters."""
    return f"{PREFIX}job:{job_id}"


def job_tasks(job_id: str) -> str:
    """List: the job's task ids in shard order."""
    return f"{PREFIX}job:{job_id}:tasks"


def job_adapter_bytes(job_id: str) -> str:
    """Hash: sha256 of an adapter the folder has seen for the job -> the task it first came from
    (a replica's or twin's task counts as the task it repeats): the fold's copy check."""
    return f"{PREFIX}job:{job_id}:adapter-bytes"


def task(task_id: str) -> str:
    """Hash: job, shard range, state, fence, attempts, lease deadline, worker, adapter."""
    return f"{PREFIX}task:{task_id}"


def adapter(adapter_id: str) -> str:
    """Hash: task, fence, sha256 (blob), manifest fields, state, reason, version folded into."""
    return f"{PREFIX}adapter:{adapter_id}"


def version(number: int) -> str:
    """Hash: parent, files JSON (path -> blob), patch blob, adapters JSON, metrics."""
    return f"{PREFIX}version:{number}"


def worker(worker_id: str) -> str:
    """Hash: name, card (serialized proto, hex), node id, token hash, registered, counters, speed."""
    return f"{PREFIX}worker:{worker_id}"


def trust(volunteer: str) -> str:
    """Hash: a volunteer's outcome counts ("n:<outcome>") and its newest outcomes ("recent", JSON)."""
    return f"{PREFIX}trust:{volunteer}"


def trust_versions(volunteer: str) -> str:
    """Zset: version number -> how many of the volunteer's adapters were folded into it."""
    return f"{PREFIX}trust:{volunteer}:versions"


def replicas(task_id: str) -> str:
    """Hash: a replicated task's runs (JSON list), their adapters (JSON run -> adapter), base
    version, state, opened."""
    return f"{PREFIX}replicas:{task_id}"
# Outbound-only workers (coordinator.ledger.inbox): the hand-off between the scheduler and
# whichever coordinator frontend serves a worker's long-poll.
OUTBOUND_POLLS = PREFIX + "outbound:polls"  # zset: worker id -> when it last asked for work
OUTBOUND_RESULTS = PREFIX + "outbound:results"  # list: JSON run reports, for the scheduler


def inbox(worker_id: str) -> str:
    """List: JSON runs placed on an outbound worker, waiting for its next long-poll."""
    return f"{PREFIX}outbound:inbox:{worker_id}"


def outbound_run(run_id: str) -> str:
    """Hash: worker (its id), units (JSON [[task id, fence], ...]), taken (when it was handed out)."""
    return f"{PREFIX}outbound:run:{run_id}"


def token_workers(token_hash: str) -> str:
    """Set: the ids of the workers a token registered (how many it has active is read from WORKERS)."""
    return f"{PREFIX}token:{token_hash}:workers"
