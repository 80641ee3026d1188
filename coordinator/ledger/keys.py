"""Every Redis key the ledger uses, in one place.

Redis holds state, never blobs: ids, counters, small JSON documents, and content hashes that
point into the blob store.
"""

PREFIX = "nomoat:"


def _key(*parts: object) -> str:
    """``PREFIX`` and the parts joined by ":" (every key below that names one thing is built so)."""
    return PREFIX + ":".join(str(p) for p in parts)


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
# string: the secret key replication samples tasks with (coordinator.schedule.replication.sampled);
# made once, shared by every coordinator process on this ledger, never sent anywhere.
SAMPLING_KEY = PREFIX + "replication:key"
# hash: Ray node id -> the worker that last finished a run on it (Workers.record_run): a node that
# names no worker finds its speed here, without reading every worker ever registered
NODE_WORKERS = PREFIX + "workers:by-node"
DURABLE_MARK = PREFIX + "durable"  # counter: written just before a WAIT (coordinator.ledger.connect.Durability)


# Volunteers minted by the join code (coordinator.ledger.volunteers)
VOLUNTEERS = PREFIX + "volunteers"  # zset: volunteer id (its token's id) -> when it joined
JOIN_CODE = PREFIX + "join:code"  # string: the token id of the current join code (rotation revokes it)
REFUSALS = PREFIX + "refusals:recent"  # list: JSON of the newest refusals (uploads, fold gates), newest first


def job(job_id: str) -> str:
    """Hash: name, state, dataset, records blob, config JSON, counters. Its tasks by state are
    "tasks:<state>" (and its speculative twins' "twins:<state>"), kept by the scripts that change a
    task's state (coordinator.ledger.tasks.COUNT); "counted" marks a job whose tasks are counted."""
    return _key("job", job_id)


def job_events(job_id: str) -> str:
    """List: JSON [when, "task: note"] of the newest notes of the job's task runs, newest first."""
    return _key("job", job_id, "events")


def job_tasks(job_id: str) -> str:
    """List: the job's task ids in shard order."""
    return _key("job", job_id, "tasks")


def job_adapter_bytes(job_id: str) -> str:
    """Hash: sha256 of an adapter the folder has seen for the job -> the task it first came from
    (a replica's or twin's task counts as the task it repeats): the fold's copy check."""
    return _key("job", job_id, "adapter-bytes")


def task(task_id: str) -> str:
    """Hash: job, shard range, state, fence, attempts, lease deadline, the worker its lease was
    placed on (holder_worker) and the sha256 of its lease secret, memory floors per card, adapter."""
    return _key("task", task_id)


def adapter(adapter_id: str) -> str:
    """Hash: task, fence, sha256 (blob), manifest fields, state, reason, version folded into."""
    return _key("adapter", adapter_id)


def version(number: int) -> str:
    """Hash: parent, files JSON (path -> blob), patch blob, adapters JSON, metrics."""
    return _key("version", number)


def worker(worker_id: str) -> str:
    """Hash: name, card (serialized proto, hex), node id, token hash, registered, counters, speed."""
    return _key("worker", worker_id)


def trust(volunteer: str) -> str:
    """Hash: a volunteer's outcome counts ("n:<outcome>") and its newest outcomes ("recent", JSON)."""
    return _key("trust", volunteer)


def trust_versions(volunteer: str) -> str:
    """Zset: version number -> how many of the volunteer's adapters were folded into it."""
    return _key("trust", volunteer, "versions")


def volunteer_retired(volunteer: str) -> str:
    """Hash: what a volunteer's expired records came to (coordinator.model.retention): its workers
    gone past the policy's days ("workers", "tasks_done", "tokens_trained"), and the folded
    adapters of the versions trimmed from its trust_versions ("older_versions_adapters")."""
    return f"{PREFIX}trust:{volunteer}:retired"


def replicas(task_id: str) -> str:
    """Hash: a replicated task's runs (JSON list), their adapters (JSON run -> adapter), base
    version, state, opened."""
    return _key("replicas", task_id)


# Outbound-only workers (coordinator.ledger.inbox): the hand-off between the scheduler and
# whichever coordinator frontend serves a worker's long-poll.
OUTBOUND_POLLS = PREFIX + "outbound:polls"  # zset: worker id -> when it last asked for work
OUTBOUND_RESULTS = PREFIX + "outbound:results"  # list: JSON run reports, for the scheduler
# pub/sub channel: a worker id, published when a run is placed in its inbox, so the gateway
# serving its long-poll looks at once (coordinator.gateway.long_polls); a lost message costs a delay
INBOX_WAKE = PREFIX + "outbound:wake"


def inbox(worker_id: str) -> str:
    """List: JSON runs placed on an outbound worker, waiting for its next long-poll."""
    return _key("outbound", "inbox", worker_id)


def outbound_run(run_id: str) -> str:
    """Hash: worker (its id), units (JSON [[task id, fence], ...]), taken (when it was handed out)."""
    return _key("outbound", "run", run_id)


def token_workers(token_hash: str) -> str:
    """Set: the ids of the workers a token registered (how many it has active is read from WORKERS)."""
    return _key("token", token_hash, "workers")


# Quotas (coordinator.ledger.quotas), per caller: its identity id (coordinator.gateway.quotas.owner_of).
def quota_streams(owner: str) -> str:
    """Zset: the caller's open streams (a random stream id) -> when the slot expires."""
    return _key("quota", owner, "streams")


def quota_jobs(owner: str) -> str:
    """Zset: the caller's submitted jobs not yet seen finished -> their task count."""
    return _key("quota", owner, "jobs")


def quota_bytes(owner: str, day: str) -> str:
    """Counter: dataset bytes the caller submitted on ``day`` (UTC, YYYYMMDD); expires after two days."""
    return _key("quota", owner, "bytes", day)


# Leader leases (coordinator.ledger.leaders): one scheduler and one folder at a time.
LEADER_ROLES = ("scheduler", "folder")


def leader(role: str) -> str:
    """String, with a TTL: "<fence>:<holder>" of the process leading ``role`` (absent: nobody leads)."""
    return _key("leader", role)


def leader_fence(role: str) -> str:
    """Counter: the fences of ``role``'s leader terms, strictly increasing (a new one per term)."""
    return _key("leader", role, "fence")


# History operations an admin asked for (coordinator.ledger.operations): a gateway queues them, the
# folding leader carries them out under its fence and answers on the request's own list.
OPERATIONS = PREFIX + "operations"  # list: JSON requests {id, kind, arg, deadline}, oldest at the right


def operation_answer(request_id: str) -> str:
    """List: JSON answers to one request ("started", then its outcome), for the asking gateway; expires."""
    return _key("operations", request_id, "answer")


IDLE_JOBS = PREFIX + "jobs:idle"  # string: JSON list of running jobs with nothing left to train (the scheduler's word to the folder)


def volunteer(volunteer_id: str) -> str:
    """Hash: name, joined, source (the address it joined from), banned (when)."""
    return _key("volunteer", volunteer_id)


def join_rate(scope: str, window: int) -> str:
    """Counter: volunteers minted in one window of time, from one source address or ("*") overall."""
    return _key("join", "rate", window, scope)
