from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobConfig(_message.Message):
    __slots__ = ("lora_rank", "lora_alpha", "target_modules", "seq_len", "learning_rate", "batch_size", "epochs", "tokens_per_task", "warm_start")
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    WARM_START_FIELD_NUMBER: _ClassVar[int]
    lora_rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    seq_len: int
    learning_rate: float
    batch_size: int
    epochs: int
    tokens_per_task: int
    warm_start: bool
    def __init__(self, lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., seq_len: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., tokens_per_task: _Optional[int] = ..., warm_start: _Optional[bool] = ...) -> None: ...

class SubmitHeader(_message.Message):
    __slots__ = ("name", "filename", "size", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    filename: str
    size: int
    config: JobConfig
    def __init__(self, name: _Optional[str] = ..., filename: _Optional[str] = ..., size: _Optional[int] = ..., config: _Optional[_Union[JobConfig, _Mapping]] = ...) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("header", "data", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: SubmitHeader
    data: bytes
    sha256: str
    def __init__(self, header: _Optional[_Union[SubmitHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("job_id", "tasks", "records", "tokens", "validation_records")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_RECORDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tasks: int
    records: int
    tokens: int
    validation_records: int
    def __init__(self, job_id: _Optional[str] = ..., tasks: _Optional[int] = ..., records: _Optional[int] = ..., tokens: _Optional[int] = ..., validation_records: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job_id", "limit", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    limit: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TaskCounts(_message.Message):
    __slots__ = ("pending", "leased", "done", "failed")
    PENDING_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    pending: int
    leased: int
    done: int
    failed: int
    def __init__(self, pending: _Optional[int] = ..., leased: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("job_id", "name", "state", "tasks", "total_tasks", "adapters_folded", "adapters_rejected", "error", "created", "tokens", "dataset_sha256", "base_loss", "warning", "events", "training", "noise_scale")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TASKS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_LOSS_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: str
    tasks: TaskCounts
    total_tasks: int
    adapters_folded: int
    adapters_rejected: int
    error: str
    created: float
    tokens: int
    dataset_sha256: str
    base_loss: float
    warning: str
    events: _containers.RepeatedScalarFieldContainer[str]
    training: str
    noise_scale: float
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., tasks: _Optional[_Union[TaskCounts, _Mapping]] = ..., total_tasks: _Optional[int] = ..., adapters_folded: _Optional[int] = ..., adapters_rejected: _Optional[int] = ..., error: _Optional[str] = ..., created: _Optional[float] = ..., tokens: _Optional[int] = ..., dataset_sha256: _Optional[str] = ..., base_loss: _Optional[float] = ..., warning: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ..., training: _Optional[str] = ..., noise_scale: _Optional[float] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "name", "card", "last_seen", "tasks_done", "state", "trust", "trust_score", "trust_reason", "kind")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    TRUST_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRUST_REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    name: str
    card: Card
    last_seen: float
    tasks_done: int
    state: str
    trust: str
    trust_score: float
    trust_reason: str
    kind: str
    def __init__(self, worker_id: _Optional[str] = ..., name: _Optional[str] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., last_seen: _Optional[float] = ..., tasks_done: _Optional[int] = ..., state: _Optional[str] = ..., trust: _Optional[str] = ..., trust_score: _Optional[float] = ..., trust_reason: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "parent", "eval_loss", "adapters", "created", "job_id", "adapter_ids", "operation")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    eval_loss: float
    adapters: int
    created: float
    job_id: str
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    operation: str
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., eval_loss: _Optional[float] = ..., adapters: _Optional[int] = ..., created: _Optional[float] = ..., job_id: _Optional[str] = ..., adapter_ids: _Optional[_Iterable[str]] = ..., operation: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("jobs", "workers", "versions", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("job", "current_version", "eval_loss", "finished")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    current_version: int
    eval_loss: float
    finished: bool
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., current_version: _Optional[int] = ..., eval_loss: _Optional[float] = ..., finished: _Optional[bool] = ...) -> None: ...

class WorkRequest(_message.Message):
    __slots__ = ("worker_id", "wait_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    wait_s: float
    def __init__(self, worker_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class WorkReply(_message.Message):
    __slots__ = ("run_id", "task_specs", "poll_again_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_SPECS_FIELD_NUMBER: _ClassVar[int]
    POLL_AGAIN_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_specs: _containers.RepeatedScalarFieldContainer[str]
    poll_again_s: float
    def __init__(self, run_id: _Optional[str] = ..., task_specs: _Optional[_Iterable[str]] = ..., poll_again_s: _Optional[float] = ...) -> None: ...

class RunReport(_message.Message):
    __slots__ = ("worker_id", "run_id", "units", "handed_back", "lease_secrets")
    class LeaseSecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    HANDED_BACK_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRETS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    run_id: str
    units: _containers.RepeatedScalarFieldContainer[str]
    handed_back: _containers.RepeatedScalarFieldContainer[str]
    lease_secrets: _containers.ScalarMap[str, str]
    def __init__(self, worker_id: _Optional[str] = ..., run_id: _Optional[str] = ..., units: _Optional[_Iterable[str]] = ..., handed_back: _Optional[_Iterable[str]] = ..., lease_secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RunReportReply(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class WorkerStatsRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class CheckCount(_message.Message):
    __slots__ = ("check", "count")
    CHECK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    check: str
    count: int
    def __init__(self, check: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class VersionShare(_message.Message):
    __slots__ = ("version", "adapters")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    adapters: int
    def __init__(self, version: _Optional[int] = ..., adapters: _Optional[int] = ...) -> None: ...

class WorkerStatsReply(_message.Message):
    __slots__ = ("volunteer", "workers", "tasks_done", "tokens_trained", "adapters_folded", "adapters_refused", "replicas_agreed", "replicas_disagreed", "reasons", "recent", "versions", "trust", "trust_score", "trust_reason")
    VOLUNTEER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_REFUSED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_AGREED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_DISAGREED_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TRUST_FIELD_NUMBER: _ClassVar[int]
    TRUST_SCORE_FIELD_NUMBER: _ClassVar[int]
    TRUST_REASON_FIELD_NUMBER: _ClassVar[int]
    volunteer: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    tasks_done: int
    tokens_trained: float
    adapters_folded: int
    adapters_refused: int
    replicas_agreed: int
    replicas_disagreed: int
    reasons: _containers.RepeatedCompositeFieldContainer[CheckCount]
    recent: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.RepeatedCompositeFieldContainer[VersionShare]
    trust: str
    trust_score: float
    trust_reason: str
    def __init__(self, volunteer: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., tasks_done: _Optional[int] = ..., tokens_trained: _Optional[float] = ..., adapters_folded: _Optional[int] = ..., adapters_refused: _Optional[int] = ..., replicas_agreed: _Optional[int] = ..., replicas_disagreed: _Optional[int] = ..., reasons: _Optional[_Iterable[_Union[CheckCount, _Mapping]]] = ..., recent: _Optional[_Iterable[str]] = ..., versions: _Optional[_Iterable[_Union[VersionShare, _Mapping]]] = ..., trust: _Optional[str] = ..., trust_score: _Optional[float] = ..., trust_reason: _Optional[str] = ...) -> None: ...

class UploadOffsetRequest(_message.Message):
    __slots__ = ("task_id", "fence", "sha256", "worker_id", "lease_secret")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fence: int
    sha256: str
    worker_id: str
    lease_secret: str
    def __init__(self, task_id: _Optional[str] = ..., fence: _Optional[int] = ..., sha256: _Optional[str] = ..., worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class UploadOffsetReply(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class UploadTargetRequest(_message.Message):
    __slots__ = ("task_id", "fence", "sha256", "size", "worker_id", "lease_secret")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fence: int
    sha256: str
    size: int
    worker_id: str
    lease_secret: str
    def __init__(self, task_id: _Optional[str] = ..., fence: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class UploadTargetReply(_message.Message):
    __slots__ = ("url", "expires_in_s")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    url: str
    expires_in_s: float
    def __init__(self, url: _Optional[str] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class Card(_message.Message):
    __slots__ = ("name", "vram_gb", "compute_capability", "bf16", "backend", "simulated", "tflops", "loads_4bit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VRAM_GB_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    BF16_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    TFLOPS_FIELD_NUMBER: _ClassVar[int]
    LOADS_4BIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    vram_gb: float
    compute_capability: str
    bf16: bool
    backend: str
    simulated: bool
    tflops: float
    loads_4bit: bool
    def __init__(self, name: _Optional[str] = ..., vram_gb: _Optional[float] = ..., compute_capability: _Optional[str] = ..., bf16: _Optional[bool] = ..., backend: _Optional[str] = ..., simulated: _Optional[bool] = ..., tflops: _Optional[float] = ..., loads_4bit: _Optional[bool] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "card", "node_id", "worker_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CARD_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    card: Card
    node_id: str
    worker_id: str
    def __init__(self, name: _Optional[str] = ..., card: _Optional[_Union[Card, _Mapping]] = ..., node_id: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("worker_id", "ray_address", "ray_auth_token", "lineage", "credential", "volunteer_id")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAY_AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    VOLUNTEER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    ray_address: str
    ray_auth_token: str
    lineage: str
    credential: str
    volunteer_id: str
    def __init__(self, worker_id: _Optional[str] = ..., ray_address: _Optional[str] = ..., ray_auth_token: _Optional[str] = ..., lineage: _Optional[str] = ..., credential: _Optional[str] = ..., volunteer_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("task_id", "fence", "worker_id", "event", "lease_secret")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fence: int
    worker_id: str
    event: str
    lease_secret: str
    def __init__(self, task_id: _Optional[str] = ..., fence: _Optional[int] = ..., worker_id: _Optional[str] = ..., event: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("ok", "deadline", "reason", "base_version", "lineage")
    OK_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    deadline: float
    reason: str
    base_version: int
    lineage: str
    def __init__(self, ok: _Optional[bool] = ..., deadline: _Optional[float] = ..., reason: _Optional[str] = ..., base_version: _Optional[int] = ..., lineage: _Optional[str] = ...) -> None: ...

class FetchShardRequest(_message.Message):
    __slots__ = ("task_id", "fence", "worker_id", "lease_secret")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fence: int
    worker_id: str
    lease_secret: str
    def __init__(self, task_id: _Optional[str] = ..., fence: _Optional[int] = ..., worker_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data", "url", "sha256", "size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    sha256: str
    size: int
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("task_id", "fence", "base_version", "rank", "alpha", "tokens", "train_loss", "sha256", "size", "worker_id", "offset", "train_seconds", "lineage", "grad_micro_sq", "grad_batch_sq", "grad_micro_batch", "grad_batch_size", "lease_secret", "in_store")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    GRAD_MICRO_SQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_BATCH_SQ_FIELD_NUMBER: _ClassVar[int]
    GRAD_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    IN_STORE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    fence: int
    base_version: int
    rank: int
    alpha: float
    tokens: int
    train_loss: float
    sha256: str
    size: int
    worker_id: str
    offset: int
    train_seconds: float
    lineage: str
    grad_micro_sq: float
    grad_batch_sq: float
    grad_micro_batch: float
    grad_batch_size: float
    lease_secret: str
    in_store: bool
    def __init__(self, task_id: _Optional[str] = ..., fence: _Optional[int] = ..., base_version: _Optional[int] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., worker_id: _Optional[str] = ..., offset: _Optional[int] = ..., train_seconds: _Optional[float] = ..., lineage: _Optional[str] = ..., grad_micro_sq: _Optional[float] = ..., grad_batch_sq: _Optional[float] = ..., grad_micro_batch: _Optional[float] = ..., grad_batch_size: _Optional[float] = ..., lease_secret: _Optional[str] = ..., in_store: _Optional[bool] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: AdapterManifest
    data: bytes
    def __init__(self, manifest: _Optional[_Union[AdapterManifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "adapter_id", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    adapter_id: str
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("version", "format", "since", "resume")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HF: _ClassVar[PullRequest.Format]
        PEFT: _ClassVar[PullRequest.Format]
        PATCHES: _ClassVar[PullRequest.Format]
    HF: PullRequest.Format
    PEFT: PullRequest.Format
    PATCHES: PullRequest.Format
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    version: int
    format: PullRequest.Format
    since: int
    resume: _containers.RepeatedCompositeFieldContainer[ResumeFrom]
    def __init__(self, version: _Optional[int] = ..., format: _Optional[_Union[PullRequest.Format, str]] = ..., since: _Optional[int] = ..., resume: _Optional[_Iterable[_Union[ResumeFrom, _Mapping]]] = ...) -> None: ...

class ResumeFrom(_message.Message):
    __slots__ = ("path", "sha256", "offset")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    offset: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("path", "size", "sha256", "offset", "url")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    offset: int
    url: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class PullHeader(_message.Message):
    __slots__ = ("version", "files", "lineage")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    version: int
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    lineage: str
    def __init__(self, version: _Optional[int] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., lineage: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PullChunk(_message.Message):
    __slots__ = ("header", "file")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    header: PullHeader
    file: FileChunk
    def __init__(self, header: _Optional[_Union[PullHeader, _Mapping]] = ..., file: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class ListVolunteersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VolunteerInfo(_message.Message):
    __slots__ = ("volunteer_id", "name", "joined", "worker_ids", "active_workers", "standing", "trust_score", "reason", "role")
    VOLUNTEER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    STANDING_FIELD_NUMBER: _ClassVar[int]
    TRUST_SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    volunteer_id: str
    name: str
    joined: float
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    active_workers: int
    standing: str
    trust_score: float
    reason: str
    role: str
    def __init__(self, volunteer_id: _Optional[str] = ..., name: _Optional[str] = ..., joined: _Optional[float] = ..., worker_ids: _Optional[_Iterable[str]] = ..., active_workers: _Optional[int] = ..., standing: _Optional[str] = ..., trust_score: _Optional[float] = ..., reason: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class ListVolunteersReply(_message.Message):
    __slots__ = ("volunteers",)
    VOLUNTEERS_FIELD_NUMBER: _ClassVar[int]
    volunteers: _containers.RepeatedCompositeFieldContainer[VolunteerInfo]
    def __init__(self, volunteers: _Optional[_Iterable[_Union[VolunteerInfo, _Mapping]]] = ...) -> None: ...

class VolunteerRequest(_message.Message):
    __slots__ = ("volunteer_id",)
    VOLUNTEER_ID_FIELD_NUMBER: _ClassVar[int]
    volunteer_id: str
    def __init__(self, volunteer_id: _Optional[str] = ...) -> None: ...

class VolunteerReply(_message.Message):
    __slots__ = ("volunteer_id", "leases_dropped")
    VOLUNTEER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    volunteer_id: str
    leases_dropped: int
    def __init__(self, volunteer_id: _Optional[str] = ..., leases_dropped: _Optional[int] = ...) -> None: ...

class RotateJoinCodeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateJoinCodeReply(_message.Message):
    __slots__ = ("join_code",)
    JOIN_CODE_FIELD_NUMBER: _ClassVar[int]
    join_code: str
    def __init__(self, join_code: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("role", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    name: str
    def __init__(self, role: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CreateTokenReply(_message.Message):
    __slots__ = ("token", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class RevokeTokenReply(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("token_id", "role", "name", "created")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    role: str
    name: str
    created: float
    def __init__(self, token_id: _Optional[str] = ..., role: _Optional[str] = ..., name: _Optional[str] = ..., created: _Optional[float] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensReply(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class UnmergeRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class VersionReply(_message.Message):
    __slots__ = ("version", "eval_loss")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    version: int
    eval_loss: float
    def __init__(self, version: _Optional[int] = ..., eval_loss: _Optional[float] = ...) -> None: ...

class SweepRequest(_message.Message):
    __slots__ = ("dry_run",)
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    def __init__(self, dry_run: _Optional[bool] = ...) -> None: ...

class SweepReply(_message.Message):
    __slots__ = ("lines", "blobs", "bytes", "records")
    LINES_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    blobs: int
    bytes: int
    records: int
    def __init__(self, lines: _Optional[_Iterable[str]] = ..., blobs: _Optional[int] = ..., bytes: _Optional[int] = ..., records: _Optional[int] = ...) -> None: ...
