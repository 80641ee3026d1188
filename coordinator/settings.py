"""The coordinator's settings: built once at start-up (from the command line) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class JobDefaults:
    """Training settings a job gets unless its submitter chose otherwise."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    seq_len: int = 128
    learning_rate: float = 2e-3
    batch_size: int = 8
    epochs: int = 1
    # One unit: what a lease, a fence and an adapter cover. Every unit trains a fresh LoRA, and a
    # fresh LoRA's first optimizer steps are mostly noise, so a unit needs enough steps to be worth
    # folding: 32768 tokens is 32 steps at the job's batch (8 x 128), 128 at the batch a task
    # trains at when four adapters fold together (Settings.keep_global_batch: 8 / 4 = 2).
    tokens_per_task: int = 32768
    # Plan memory as if the base model were this one (nomoat.memory.PRESET_CONFIGS); "" plans for
    # the base model itself. For simulated clusters, where the tiny model stands in for a real one.
    plan_model: str = ""
    # Opt-in warm starts: each task continues from its worker's previous adapter of the job (its
    # factors and AdamW moments, kept on the worker) and uploads the exact rank-2r difference.
    # Off by default: bench/quality.py measured it no better than fresh adapters (bench/README.md).
    warm_start: bool = False


ROLES = ("all", "gateway", "scheduler", "folder")  # what one coordinator process does (Settings.role)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    # all: everything in one process (the default, the demo). gateway: gRPC and HTTP only, as many
    # as wanted; scheduler, folder: that loop only, under a leader lease (one leads, the rest wait).
    # Several "all" processes on one Redis are safe too: each serves, one schedules, one folds.
    role: str = "all"
    # A leader's lease (coordinator.ledger.leaders): a standby takes over within about this long
    # after its leader dies; a leader that cannot renew for this long stops writing.
    leader_ttl_s: float = 15.0
    listen: str = "127.0.0.1:50051"
    # Where volunteers reach this coordinator (printed in the join command); defaults to listen.
    public_address: str = ""
    redis_url: str | None = None  # None: start the embedded redis-server in data_dir/redis
    ray_address: str | None = None  # None: start a Ray head (token auth on, dashboard on loopback)
    # The token of the cluster at ray_address; None: where Ray looks (RAY_AUTH_TOKEN, ~/.ray/auth_token).
    ray_token_file: str | None = None
    ray_port: int = 0  # 0: pick a free port for the Ray head's GCS
    ray_node_ip: str = "127.0.0.1"
    base_model: str = "tiny"  # a Hugging Face model folder, or "tiny"
    job: JobDefaults = field(default_factory=JobDefaults)

    # Folding (DESIGN.md, "Folding math"): fold when this many adapters wait, or the oldest
    # waited this long, or their job has nothing left outstanding.
    fold_every: int = 4
    fold_timeout_s: float = 120.0
    max_staleness: int = 16
    # Weights w_i = n_i s(τ_i) / Σ n_j s(τ_j), which sum to 1 (False: / Σ n_j, the earlier rule,
    # under which staleness shrinks the whole fold). bench/quality.py measured normalised better.
    normalise_staleness: bool = True
    # Keep the global batch: the adapters one fold averages add up to the job's batch. Each task
    # trains at batch_size / K (K = the adapters the next fold averages: fold_every, or fewer
    # when fewer cards fit the job), K times the steps on the same tokens, at
    # coordinator.fold.policy.lr_scale(K) times the job's lr. Measured by bench/quality.py (4 workers,
    # one pass): 0.45 of the best centralized run without it, 0.74 with it (bench/README.md).
    keep_global_batch: bool = True
    # Size the global batch from the job's gradient noise scale (coordinator.schedule.noise, from the
    # norms its workers report): between K and the job's batch, at the noise scale
    # (FoldPolicy.task_training). Off: on the tiny model the noise scale measured ~150-260
    # sequences, far above a job's batch of 8, so it would keep the job's batch (bench/README.md).
    size_from_noise: bool = False
    # A fold of m adapters whose tasks were sized for K > m (the fold timed out, a small job) takes
    # m/K of a step (FoldPolicy.weights): each adapter counts as its share of the job's batch.
    partial_folds: bool = True
    eval_epsilon: float = 0.02  # nats of held-out loss a new version may cost against its parent
    # Nats one adapter, added whole to the current version, may cost. Looser than eval_epsilon:
    # an adapter trained on an older version overshoots when added whole on top of a newer one
    # that already holds its peers' progress, yet is useful averaged into a fold; this gate is for
    # broken or hostile adapters, whose damage is far larger.
    adapter_epsilon: float = 0.1
    norm_factor: float = 20.0  # ‖ΔW‖ may be at most this × the median of recent adapters
    # The shard proof (FoldPolicy.learned_from_shard): an adapter must lower loss on a sample of
    # shard_tokens tokens of its own shard by shard_sigmas paired standard errors, and that many
    # more than on the held-out slice; 0 turns it off (--shard-sigmas). Where its fold has other
    # adapters of the job, both sides are measured against their mean update instead of the current
    # model. bench/shardproof.py, default 32768-token tasks: see bench/README.md ("Session 7").
    shard_sigmas: float = 2.0
    shard_tokens: int = 2048
    # ... drawn from the blocks its task trained on last, about this many tokens of them (the
    # folder replays the trainer's seeded order: nomoat.packing.most_recent_first).
    shard_window_tokens: int = 4096
    snapshot_every: int = 10  # a full snapshot every N versions; patches in between
    # Optional outer optimizer (DiLoCo): Nesterov momentum on the folded delta. 0 turns it off.
    outer_momentum: float = 0.0
    outer_lr: float = 1.0
    outer_terms: int = 8  # past deltas kept in the momentum (μ^9 ≈ 0.39 at μ = 0.9: a truncation)

    # Leases: a dispatched task may wait this long for Ray to place it; once its worker
    # heartbeats, each heartbeat buys lease_ttl_s more.
    queue_timeout_s: float = 900.0
    # A run placed in an outbound volunteer's inbox must be taken (its worker's first heartbeat)
    # within this, else its lease expires like any abandoned one (back in the queue without an
    # attempt, the volunteer charged): a volunteer that stopped polling, or vanished on purpose
    # after one poll, holds its last placements this long, not queue_timeout_s. A live worker
    # takes a run within one long-poll (long_poll_s) and heartbeats before any work.
    claim_timeout_s: float = 120.0
    lease_ttl_s: float = 90.0
    max_attempts: int = 3
    # Workers one token may have active at once (a volunteer with several cards runs one each);
    # bounds what a leaked or abused worker token can register.
    max_workers_per_token: int = 16
    # Volunteers the join code may mint (coordinator.schedule.roster) per join_window_s: from one
    # source address, and from everywhere together. A worker that joined keeps its credential,
    # so only new identities count.
    joins_per_address: int = 20
    joins_overall: int = 1000
    join_window_s: int = 3600
    max_in_flight: int = 64
    # Throughput-aware sizing: a dispatch to a card is a run of consecutive units (tasks) of one
    # job, as many as the card's measured tokens/s gets through in about target_task_seconds.
    target_task_seconds: float = 60.0
    max_units_per_run: int = 16
    pending_window: int = 2000  # pending tasks looked at per round, oldest first
    # Near a job's end (nothing pending, a card idle) its slowest outstanding tasks also go to
    # idle cards; the first valid result wins (see Ledger.speculate).
    speculate: bool = True
    # Replication (coordinator.schedule.replication): this share of tasks is also run by a second
    # volunteer with the same seed, shard and base version, and the two adapters compared; every
    # task of a throttled volunteer is. Two runs agree within replica_tolerance (relative
    # Frobenius distance of their updates ΔW) and replica_loss_tolerance (nats of training loss);
    # bench/replication.py measured honest runs of one seed at 0 (same plan) and 1.0e-5 (another
    # micro-batch), another seed at 1.35, an update scaled x50 at 0.98. A replica that no one
    # runs within replica_timeout_s leaves its task folded unverified.
    replicate_fraction: float = 0.05
    replica_tolerance: float = 0.05
    replica_loss_tolerance: float = 0.02
    replica_timeout_s: float = 1800.0

    # Held-out evaluation (coordinator/fold/evaluators.py, docs/evaluation.md). Where the running model
    # and its evaluations live: cpu, cuda (cuda:N), or auto (cuda when there is one).
    device: str = "cpu"
    # Tokens of a job's validation slice that every evaluation reads (the same tokens for parent
    # and candidate, compared block by block). Measured by bench/eval_noise.py (docs/evaluation.md):
    # at 2048 tokens the paired difference's spread is 0.010 nats on the tiny model with adapters
    # trained for real (half of eval_epsilon; unpaired, 0.19). 0 reads the whole slice.
    eval_tokens: int = 2048
    # "bf16": evaluations run their matmuls under bf16 autocast (no second copy of the weights):
    # ~6x faster than fp32 on a CPU with AMX (measured on this machine), the usual on a GPU.
    eval_dtype: str = "fp32"
    # Where evaluations run (coordinator/fold/evaluators.py): "coordinator" (on --device), "workers"
    # (as evaluation tasks on trusted workers' cards, on the coordinator when none can take one),
    # or "auto": on the coordinator when --device is CUDA or no trusted worker is up, else on one.
    eval_on: str = "auto"
    # A delegated evaluation that has not come back after this long (waiting for its card
    # included) is given up and run on the coordinator; it bounds what a lost worker costs a fold.
    eval_timeout_s: float = 120.0
    validation_fraction: float = 0.05
    max_validation_records: int = 256
    max_dataset_bytes: int = 256 << 20
    max_adapter_bytes: int = 256 << 20
    tick_s: float = 0.5
    tls_cert: str | None = None
    tls_key: str | None = None
    # Serve plain gRPC beyond loopback (no TLS at all). Only where something else protects the
    # network: a Kubernetes cluster's own network, whose kubelet gRPC probes cannot speak TLS.
    insecure_plaintext: bool = False
    # HOST:PORT of the HTTP port (coordinator.gateway.web: the dashboard, its data, /metrics); "" serves
    # none. (`nomoat coordinator start` serves 127.0.0.1:8470 unless told otherwise.)
    http: str = ""
    http_interval_s: float = 1.0  # how often the dashboard's live stream reads the ledger
    # Outbound-only workers (coordinator.schedule.inbox_dispatch): the longest a long-poll for work is held, and
    # how long a worker may go without asking for work (or reporting) before it leaves the cards
    # the scheduler places runs on.
    long_poll_s: float = 20.0
    outbound_liveness_s: float = 60.0
    # Streams one gateway holds at once, by kind (coordinator.gateway.lanes): past them a caller
    # is refused at once with a sentence. Heartbeats and registration have threads of their own
    # and are never refused for capacity.
    max_watch_streams: int = 512
    max_pull_streams: int = 32
    max_shard_streams: int = 64
    max_submit_streams: int = 8
    max_upload_streams: int = 32
    # Of each kind, the share one caller may hold at once (at least one stream): one volunteer's
    # slow reads of 32 pulls would otherwise take every Pull from everyone.
    stream_share_per_caller: float = 0.25
    # Each caller's share, across every gateway (coordinator.gateway.quotas; admin not counted):
    # streams one identity holds open at once, and a submitter's running jobs, the tasks they
    # hold, and the dataset bytes it may submit a UTC day.
    max_streams_per_caller: int = 64
    max_jobs_per_submitter: int = 8
    max_pending_tasks_per_submitter: int = 20000
    max_submit_bytes_per_day: int = 4 << 30
    # Partial uploads (coordinator.collect.partial_uploads): swept this often, of leases that
    # ended and of any part left this long.
    upload_sweep_s: float = 300.0
    partial_upload_max_age_s: float = 6 * 3600.0
    # A PEFT pull (`nomoat pull --since N --format peft`) is built in memory from the stored
    # patches since N: past this many bytes of patches it is refused (pull the full version).
    max_peft_pull_bytes: int = 256 << 20
    # The blob store (coordinator.model.store): "" the folder data_dir/blobs; s3://bucket/prefix an
    # object store, which clients then read and write by presigned URLs living url_ttl_s. Its
    # endpoint: store_endpoint ("": boto3's standard chain, AWS_ENDPOINT_URL or AWS itself).
    store: str = ""
    store_endpoint: str = ""
    url_ttl_s: float = 3600.0
    # Retention (coordinator.model.retention.Policy): the newest keep_versions versions keep their
    # folders, and every keep_snapshot_every-th; refused adapters and finished jobs' datasets and
    # task records go after keep_days. The folder's process sweeps every sweep_every_s (0: never).
    # A worker not seen for keep_worker_days is summarised into its volunteer's record and
    # expired; a retired job's own record goes keep_job_record_days after it finished.
    keep_versions: int = 5
    keep_snapshot_every: int = 50
    keep_days: float = 7.0
    keep_worker_days: float = 30.0
    keep_job_record_days: float = 365.0
    sweep_every_s: float = 600.0

    @property
    def join_address(self) -> str:
        return self.public_address or self.listen

    @property
    def serves(self) -> bool:
        """Whether this process serves gRPC and HTTP (a gateway)."""
        return self.role in ("all", "gateway")

    @property
    def schedules(self) -> bool:
        """Whether this process campaigns to lead the scheduler."""
        return self.role in ("all", "scheduler")

    @property
    def folds(self) -> bool:
        """Whether this process campaigns to lead the folder."""
        return self.role in ("all", "folder")

    @property
    def uses_ray(self) -> bool:
        """``--ray-address off``: no Ray at all (outbound volunteers only)."""
        return self.ray_address != "off"
