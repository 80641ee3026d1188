"""The ``nomoat`` command line: one entry point for every user.

Errors are printed as one sentence and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from nomoat import logs
from nomoat.client import CoordinatorClient, NomoatError, default_address

EXAMPLES = {
    "coordinator": "nomoat coordinator start --data-dir ./nomoat-data --listen 0.0.0.0:50051",
    "worker": "nomoat worker start --coordinator HOST:50051 --simulate-gpu 'RTX 3060:12'",
    "submit": "nomoat submit data.jsonl --name chat-v1 --wait",
    "status": "nomoat status j-1a2b3c4d --json",
    "pull": "nomoat pull --out ./model   |   nomoat pull --since 3 --format peft --out ./update",
    "demo": "nomoat demo",
}


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _remember(key: str):
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is not None:
            ctx.obj[key] = value
        return value

    return callback


def connection_options(command):
    """--coordinator/--token/--tls-ca also after the command name (`nomoat worker start --coordinator ...`)."""
    for name, key, help_text in (
        ("--tls-ca", "tls_ca", "CA certificate of a coordinator that uses TLS."),
        ("--token", "token", "Bearer token (default: NOMOAT_TOKEN)."),
        ("--coordinator", "coordinator", "HOST:PORT of the coordinator (default: NOMOAT_COORDINATOR)."),
    ):
        command = click.option(name, default=None, expose_value=False, is_eager=True,
                               callback=_remember(key), help=help_text)(command)
    return command


def _client(ctx: click.Context) -> CoordinatorClient:
    o = ctx.obj
    return CoordinatorClient(o["coordinator"], o["token"], o["tls_ca"])


class NomoatGroup(click.Group):
    """Turns NomoatError (and Ctrl-C) into a sentence instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NomoatError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=NomoatGroup)
@click.option("--coordinator", envvar="NOMOAT_COORDINATOR", default=default_address(), show_default=True,
              help="HOST:PORT of the coordinator (env NOMOAT_COORDINATOR).")
@click.option("--token", envvar="NOMOAT_TOKEN", default="", help="Bearer token (env NOMOAT_TOKEN).")
@click.option("--tls-ca", envvar="NOMOAT_TLS_CA", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA certificate to verify a coordinator that uses TLS.")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens inside.")
@click.pass_context
def main(ctx: click.Context, coordinator: str, token: str, tls_ca: str | None, verbose: bool) -> None:
    """nomoat: train one shared language model from many people's spare GPUs.

    \b
    Example: nomoat demo
    """
    # Before anything imports transformers: their progress bars are not ours to print.
    logs.quiet_libraries()
    logs.setup("plain", logging.INFO if verbose else logging.WARNING)
    ctx.obj = {"coordinator": coordinator, "token": token, "tls_ca": tls_ca, "verbose": verbose}


def log_format_option(command):
    """--log-format for the long-running commands: they log one line per state change."""
    return click.option(
        "--log-format", type=click.Choice(logs.FORMATS), default="plain", show_default=True,
        envvar="NOMOAT_LOG_FORMAT",
        help="plain: sentences; json: one JSON object a line (ts, level, logger, event, message, job/task/"
             "worker/version ids).")(command)


def _start_logging(ctx: click.Context, fmt: str) -> None:
    logs.setup(fmt, logging.DEBUG if ctx.find_root().obj.get("verbose") else logging.INFO)


# -- coordinator ------------------------------------------------------------------------------


class LazyGroup(click.Group):
    """A group whose commands are built when first asked for, so that a command whose options
    show one side's settings imports that side only when it is the command asked for."""

    def __init__(self, *args, factories: dict[str, Callable[[], click.Command]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.factories = factories or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.factories})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.factories and name not in self.commands:
            self.add_command(self.factories[name](), name)
        return super().get_command(ctx, name)


def _coordinator_start() -> click.Command:
    from coordinator.settings import JobDefaults, Settings

    @click.command("start", epilog=f"Example: {EXAMPLES['coordinator']}")
    @click.option("--data-dir", default="./nomoat-data", show_default=True, type=click.Path(file_okay=False))
    @click.option("--listen", default="127.0.0.1:50051", show_default=True, help="gRPC address to listen on.")
    @click.option("--public-address", default="", help="HOST:PORT volunteers use to reach this coordinator.")
    @click.option("--redis-url", default=None,
                  help="External Redis 6.2+/Valkey (redis://:PASSWORD@HOST:PORT/0); default: an embedded redis-server.")
    @click.option("--ray-address", default=None, help="Existing Ray cluster (HEAD:PORT); default: start a head.")
    @click.option("--ray-token-file", default=None, type=click.Path(dir_okay=False),
                  help="With --ray-address: the file holding that cluster's token "
                       "(default: RAY_AUTH_TOKEN, else ~/.ray/auth_token).")
    @click.option("--ray-node-ip", default="127.0.0.1", show_default=True, help="IP the Ray head binds to.")
    @click.option("--base-model", default="tiny", show_default=True, help="Hugging Face model folder, or 'tiny'.")
    @click.option("--fold-every", default=Settings.fold_every, show_default=True,
                  help="Fold when this many adapters wait.")
    @click.option("--fold-timeout", default=Settings.fold_timeout_s, show_default=True,
                  help="...or when the oldest waited this long (s).")
    @click.option("--tokens-per-task", default=JobDefaults.tokens_per_task, show_default=True,
                  help="Default task size in tokens (one adapter each).")
    @click.option("--outer-momentum", default=Settings.outer_momentum, show_default=True,
                  help="DiLoCo-style Nesterov momentum on each folded delta (0: plain folding).")
    @click.option("--outer-lr", default=Settings.outer_lr, show_default=True,
                  help="Outer learning rate: each folded delta is applied times this (with or without momentum).")
    @click.option("--keep-global-batch/--no-keep-global-batch", default=Settings.keep_global_batch,
                  show_default=True,
                  help="Train each task at the job's batch / the adapters one fold averages, at a scaled lr.")
    @click.option("--size-from-noise", is_flag=True, default=Settings.size_from_noise,
                  help="Size the global batch from each job's gradient noise scale (at most the job's batch).")
    @click.option("--lease-ttl", default=Settings.lease_ttl_s, show_default=True,
                  help="Seconds a task's lease lasts without a heartbeat before it is re-issued.")
    @click.option("--max-attempts", default=Settings.max_attempts, show_default=True,
                  help="Leases a task gets before it fails.")
    @click.option("--max-workers-per-token", default=Settings.max_workers_per_token, show_default=True,
                  help="Workers one token may have active at once.")
    @click.option("--replicate-fraction", default=Settings.replicate_fraction, show_default=True,
                  type=click.FloatRange(0.0, 1.0),
                  help="Share of tasks also run by a second volunteer and compared (docs/trust.md).")
    @click.option("--tls-cert", default=None, type=click.Path(exists=True, dir_okay=False))
    @click.option("--tls-key", default=None, type=click.Path(exists=True, dir_okay=False))
    @click.option("--http", "http", default=DASHBOARD, show_default=True,
                  help="HOST:PORT of the read-only dashboard and Prometheus /metrics (opened with a reader "
                       "token); 'off' serves neither.")
    @click.option("--device", default=Settings.device, show_default=True,
                  help="Where the running model and its evaluations live: cpu, cuda (cuda:N), or auto.")
    @click.option("--eval-tokens", default=Settings.eval_tokens, show_default=True, type=click.IntRange(min=0),
                  help="Validation tokens each held-out evaluation reads (0: the whole slice); docs/evaluation.md.")
    @click.option("--eval-dtype", default=Settings.eval_dtype, show_default=True, type=click.Choice(["fp32", "bf16"]),
                  help="Precision of the evaluations' matmuls (bf16: autocast, much faster on AMX CPUs and GPUs).")
    @click.option("--eval-on", default=Settings.eval_on, show_default=True,
                  type=click.Choice(["auto", "coordinator", "workers"]),
                  help="Where evaluations run: the coordinator's --device, trusted workers' cards, or auto "
                       "(the coordinator when --device is CUDA or no trusted worker is up); docs/evaluation.md.")
    @click.option("--eval-timeout", default=Settings.eval_timeout_s, show_default=True,
                  type=click.FloatRange(min=0, min_open=True),
                  help="Seconds a delegated evaluation may take before the coordinator runs it itself.")
    @log_format_option
    @click.pass_context
    def coordinator_start(ctx, data_dir, listen, public_address, redis_url, ray_address, ray_token_file, ray_node_ip,
                          base_model, fold_every, fold_timeout, tokens_per_task, outer_momentum, outer_lr,
                          keep_global_batch, size_from_noise, lease_ttl, max_attempts, max_workers_per_token,
                          replicate_fraction, tls_cert, tls_key, http, device, eval_tokens, eval_dtype,
                          eval_on, eval_timeout, log_format) -> None:
        """Start the coordinator: gRPC server, Redis ledger and Ray driver. Ctrl-C stops it."""
        # OpenMP threads that sleep when idle, not spin (read when torch loads, just below): the
        # coordinator's evaluations share the CPU with its gRPC threads and Redis, and spinning
        # threads stalled an evaluation 9x on two shared cores (0.36 s against 0.04 s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from coordinator.server import Coordinator
        from nomoat.raynode import RayClusterError, RayNodeError

        _start_logging(ctx, log_format)

        if bool(tls_cert) != bool(tls_key):
            _fail("--tls-cert and --tls-key go together")
        if ray_token_file and not ray_address:
            _fail("--ray-token-file is the token of the cluster that --ray-address names; pass both")
        http = "" if http.lower() in ("off", "") else http
        host, _, port = http.rpartition(":")
        if http and (not host or not port.isdigit()):
            _fail(f"--http {http}: give HOST:PORT, such as {DASHBOARD}, or 'off'")
        settings = Settings(
            data_dir=Path(data_dir).resolve(), listen=listen, public_address=public_address, redis_url=redis_url,
            ray_address=ray_address, ray_token_file=ray_token_file, ray_node_ip=ray_node_ip, base_model=base_model,
            fold_every=fold_every, fold_timeout_s=fold_timeout, job=JobDefaults(tokens_per_task=tokens_per_task),
            outer_momentum=outer_momentum, outer_lr=outer_lr, keep_global_batch=keep_global_batch,
            size_from_noise=size_from_noise, lease_ttl_s=lease_ttl, max_attempts=max_attempts,
            max_workers_per_token=max_workers_per_token, replicate_fraction=replicate_fraction,
            tls_cert=tls_cert, tls_key=tls_key, http=http, device=device, eval_tokens=eval_tokens,
            eval_dtype=eval_dtype, eval_on=eval_on, eval_timeout_s=eval_timeout,
        )
        node = Coordinator(settings)
        try:
            click.echo(f"starting the coordinator in {settings.data_dir} ...")
            node.start()
            click.echo(f"coordinator listening on {listen}; Ray cluster at {node.ray_address}")
            click.echo(f"admin token: {settings.data_dir / 'admin.token'} (keep it secret)")
            click.echo("volunteers join with (outbound-only; no Ray, no open port):\n  " + node.join_command())
            click.echo("trusted machines only (Ray mode; its token runs code on every node, never share it):\n  "
                       + node.trusted_join_command())
            _say_dashboard(node, explicit=ctx.get_parameter_source("http") is not click.core.ParameterSource.DEFAULT)
            _wait_for_signal()
        except (RayClusterError, RayNodeError) as exc:  # an operator's cluster, or the head we start
            _fail(str(exc))
        finally:
            click.echo("shutting down ...")
            node.stop()

    return coordinator_start


DASHBOARD = "127.0.0.1:8470"  # the coordinator's HTTP port unless --http says otherwise


def _say_dashboard(node, explicit: bool) -> None:
    """Where the dashboard is, and how to open it; a port that could not be had fails the command
    only when the operator chose it (the default one taken is a warning: gRPC serves regardless)."""
    if node.web is not None:
        click.echo(f"dashboard: {node.web.url}")
        click.echo(f"  open it with ?token=$(cat {node.data_dir / 'reader.token'}), or any reader token "
                   "(nomoat token create --role reader)")
        host = node.web.host
        if not node.web.tls and host not in ("127.0.0.1", "localhost", "::1"):
            click.secho("  warning: the dashboard is reachable beyond this machine without TLS, so its token "
                        "travels in the clear; pass --tls-cert/--tls-key", fg="yellow", err=True)
    elif node.web_error:
        if explicit:
            _fail(f"{node.web_error}; choose another --http HOST:PORT, or --http off")
        click.secho(f"warning: {node.web_error}; no dashboard (choose one with --http HOST:PORT)", fg="yellow",
                    err=True)


@main.group(cls=LazyGroup, factories={"start": _coordinator_start})
def coordinator() -> None:
    """Run the coordinator (operators)."""


def _wait_for_signal() -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


# -- worker -----------------------------------------------------------------------------------


@main.group()
def worker() -> None:
    """Lend this machine's GPU (volunteers)."""


@worker.command("start", epilog=f"Example: {EXAMPLES['worker']}")
@connection_options
@click.option("--ray", "ray_mode", is_flag=True,
              help="Join the coordinator's Ray cluster as a node (trusted machines only: needs a trusted-worker "
                   "token). Default: outbound-only, no Ray and no open port.")
@click.option("--ray-address", default="", help="With --ray: HEAD:PORT of the Ray cluster; default: what the "
                                                "coordinator says.")
@click.option("--simulate-gpu", default=None, metavar="NAME:VRAM_GB[:TFLOPS]",
              help="Pretend to have this card (no GPU needed; trains on the CPU).")
@click.option("--name", default="", help="How this worker shows up in `nomoat status`.")
@click.option("--threads", default=0, help="CPU threads per task (0: torch's default).")
@click.option("--cache-dir", default=None, envvar="NOMOAT_CACHE_DIR", type=click.Path(file_okay=False),
              help="Where model versions are cached (default ~/.cache/nomoat).")
@click.option("--node-ip", default=None, help="With --ray: IP this Ray node advertises (default: Ray's choice).")
@click.option("--idle-only", is_flag=True,
              help="Train only while no other process uses the GPU and the user has been away 5 minutes.")
@click.option("--hours", default=None, metavar="START-END",
              help="Train only in this local-time window, e.g. 22-07 (wraps midnight) or 9:30-17:00.")
@click.option("--max-power", default=0.0, metavar="WATTS",
              help="Keep the card under this many watts: NVML's power limit where permitted, else resting between steps.")
@click.option("--max-upload-mbps", default=0.0, metavar="MBIT/S", help="Pace adapter uploads to this many megabits a second.")
@log_format_option
@click.pass_context
def worker_start(ctx, ray_mode, ray_address, simulate_gpu, name, threads, cache_dir, node_ip, idle_only, hours,
                 max_power, max_upload_mbps, log_format) -> None:
    """Probe the GPU and train tasks until Ctrl-C: outbound-only (the default) or as a Ray node (--ray).

    `nomoat worker pause` / `resume` (same --cache-dir) stop and restart taking work.
    """
    from worker.controls import ControlError, Controls
    from worker.gpu import NoGpu, find_gpu
    from worker.probe import ProbeError, parse_simulated, probe

    _start_logging(ctx, log_format)
    if (ray_address or node_ip) and not ray_mode:
        _fail("--ray-address and --node-ip are for Ray mode; add --ray (it needs a trusted-worker token), "
              "or leave them out to run outbound-only")
    try:
        card = parse_simulated(simulate_gpu) if simulate_gpu else probe()
    except ProbeError as exc:
        _fail(str(exc))
    cache = Path(cache_dir) if cache_dir else None
    try:
        settings = _control_settings(cache, idle_only, hours, max_power, max_upload_mbps)
        controls = Controls(settings, gpu=find_gpu() if (idle_only or max_power) else NoGpu())
        power_note = controls.limit_power()
    except ControlError as exc:
        _fail(str(exc))
    if ray_mode:
        from worker.agent import WorkerAgent

        agent = WorkerAgent(_client(ctx), card, name=name, ray_address=ray_address, cache_dir=cache,
                            threads=threads, node_ip=node_ip, tls_ca=ctx.obj["tls_ca"], controls=controls)
        joined, left = "joined the Ray cluster", "worker left the cluster"
    else:
        from worker.outbound import OutboundWorker

        agent = OutboundWorker(_client(ctx), card, name=name, cache_dir=cache, threads=threads,
                               tls_ca=ctx.obj["tls_ca"], controls=controls)
        joined, left = "joined (outbound-only)", "worker left"
    try:
        if settings.describe() or power_note:
            click.echo("; ".join(x for x in (settings.describe(), power_note) if x))
        agent.start()
        four = ", loads 4-bit bases" if card.loads_4bit else ""  # bitsandbytes on a CUDA card (QLoRA)
        click.echo(f"worker {agent.worker_id} ({card.name}, {card.vram_gb:g} GB{four}) {joined}; Ctrl-C to leave")
        agent.run()
    except RuntimeError as exc:
        _fail(str(exc))
    finally:
        agent.stop()
        controls.close()
        click.echo(left)


def _control_settings(cache_dir: Path | None, idle_only: bool = False, hours: str | None = None,
                      max_power: float = 0.0, max_upload_mbps: float = 0.0):
    """The volunteer's controls from the options; ControlError (a sentence) for a bad value."""
    from worker.cache import default_cache_dir
    from worker.controls import ControlError, ControlSettings, Hours

    if max_power < 0 or max_upload_mbps < 0:
        raise ControlError("--max-power and --max-upload-mbps take a positive number (0: no limit)")
    return ControlSettings(state_dir=Path(cache_dir or default_cache_dir()) / "control",
                           hours=Hours.parse(hours) if hours else None, idle_only=idle_only,
                           max_power_w=max_power, max_upload_mbps=max_upload_mbps)


_cache_option = click.option("--cache-dir", default=None, envvar="NOMOAT_CACHE_DIR", type=click.Path(file_okay=False),
                             help="The worker's cache dir, as given to `worker start` (default ~/.cache/nomoat).")


@worker.command("pause", epilog="Example: nomoat worker pause   (later: nomoat worker resume)")
@_cache_option
def worker_pause(cache_dir) -> None:
    """Stop taking work: the unit in training finishes, the rest go back to the coordinator."""
    from worker.controls import ControlFiles

    files = ControlFiles(_control_settings(Path(cache_dir) if cache_dir else None).state_dir)
    files.pause()
    click.echo(f"paused ({files.root / 'paused'}); the worker finishes its current unit and takes no more "
               "until `nomoat worker resume`")


@worker.command("resume", epilog="Example: nomoat worker resume")
@_cache_option
def worker_resume(cache_dir) -> None:
    """Take work again after `nomoat worker pause`."""
    from worker.controls import ControlFiles

    files = ControlFiles(_control_settings(Path(cache_dir) if cache_dir else None).state_dir)
    click.echo("resumed; the worker rejoins within a few seconds" if files.resume() else "the worker was not paused")


@worker.command("stats", epilog="Example: nomoat worker stats --token $(cat my-worker.token)")
@connection_options
@click.option("--worker", "worker_id", default="", help="Admin only: the volunteer of this worker id.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def worker_stats(ctx, worker_id: str, as_json: bool) -> None:
    """What this token's volunteer gave: tasks, tokens, adapters folded or refused (and why),
    the versions they are in, and its trust."""
    with _client(ctx) as client:
        reply = client.worker_stats(worker_id)
    if as_json:
        from google.protobuf.json_format import MessageToDict

        click.echo(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
        return
    click.echo(_stats_text(reply))


def _stats_text(reply) -> str:
    """`nomoat worker stats` as lines of at most about 80 columns."""
    lines = [f"volunteer {reply.volunteer}: {reply.trust} (trust {reply.trust_score:.2f})"]
    if reply.trust_reason:
        lines.append(f"  {reply.trust_reason}")
    lines.append(f"tasks done {reply.tasks_done}, tokens trained {reply.tokens_trained:,.0f}")
    lines.append(f"adapters folded {reply.adapters_folded}, refused {reply.adapters_refused}"
                 + (" (" + ", ".join(f"{r.check} {r.count}" for r in reply.reasons) + ")" if reply.reasons else ""))
    lines.append(f"replicas agreed {reply.replicas_agreed}, disagreed {reply.replicas_disagreed}")
    if reply.versions:
        lines.append("in versions: " + ", ".join(
            f"{v.version}" + (f" ({v.adapters} adapters)" if v.adapters > 1 else "") for v in reply.versions))
    else:
        lines.append("in versions: none yet")
    for w in reply.workers:
        lines.append(f"worker {w.worker_id} {w.name} ({w.card.name}): {w.tasks_done} tasks, {w.state}")
    failed = [r for r in reply.recent if ": accepted" not in r and ": agreed" not in r]
    if failed:
        lines.append("latest refusals:")
        lines += [f"  {r}" for r in failed[-5:]]
    return "\n".join(lines)


# -- submit / status / pull -------------------------------------------------------------------


@main.command(epilog=f"Example: {EXAMPLES['submit']}")
@connection_options
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", default="", help="A name for the job.")
@click.option("--wait", is_flag=True, help="Show progress until the job's adapters are folded.")
@click.option("--rank", default=0, help="LoRA rank (0: the coordinator's default).")
@click.option("--alpha", default=0.0, help="LoRA alpha.")
@click.option("--seq-len", default=0, help="Training sequence length.")
@click.option("--learning-rate", default=0.0, help="Learning rate.")
@click.option("--batch-size", default=0, help="Sequences per optimizer step.")
@click.option("--epochs", default=0, help="Passes over each task's shard.")
@click.option("--tokens-per-task", default=0, help="Task size in tokens.")
@click.option("--warm-start", is_flag=True,
              help="Each task continues from its worker's previous adapter of this job (factors and optimizer state).")
@click.option("--give-up-after", default=60.0, show_default=True,
              help="With --wait: seconds a job whose tasks fit no card may wait before this exits (the job stays queued).")
@click.pass_context
def submit(ctx, dataset, name, wait, rank, alpha, seq_len, learning_rate, batch_size, epochs, tokens_per_task,
           warm_start, give_up_after):
    """Submit a dataset (.jsonl with text / prompt+completion / messages, or .txt) as a job."""
    from nomoat.v1 import nomoat_pb2 as pb

    config = pb.JobConfig(lora_rank=rank, lora_alpha=alpha, seq_len=seq_len, learning_rate=learning_rate,
                          batch_size=batch_size, epochs=epochs, tokens_per_task=tokens_per_task,
                          warm_start=warm_start)
    with _client(ctx) as client:
        reply = client.submit(Path(dataset), name=name, config=config)
        click.echo(f"job {reply.job_id}: {reply.records} records, {reply.tokens} tokens, {reply.tasks} tasks "
                   f"({reply.validation_records} records held out for evaluation)")
        if wait:
            from nomoat.progress import follow

            job = follow(client, reply.job_id, grace_s=give_up_after)
            if job.state == "running" and job.warning:
                _fail(f"job {reply.job_id} cannot run on this cluster: {job.warning}. It stays queued; "
                      "`nomoat status` shows when it starts.")
            if job.state != "done":
                _fail(f"job {reply.job_id} {job.state}: {job.error or 'see nomoat status'}")
    click.echo(reply.job_id if not wait else f"job {reply.job_id} done")


@main.command(epilog=f"Example: {EXAMPLES['status']}")
@connection_options
@click.argument("job", required=False, default="")
@click.option("--json", "as_json", is_flag=True,
              help="For scripts: the StatusReply as proto3 JSON, every field (keys: docs/status-json.md).")
@click.pass_context
def status(ctx, job, as_json) -> None:
    """Jobs, tasks by state, workers and their cards, versions with eval loss."""
    from nomoat import statusview

    with _client(ctx) as client:
        reply = client.status(job)
    if as_json:
        click.echo(statusview.as_json(reply))
        return
    statusview.print_status(reply)


@main.command(epilog=f"Example: {EXAMPLES['pull']}")
@connection_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the model into.")
@click.option("--version", default=-1, help="Version number (default: the newest).")
@click.option("--since", default=None, type=int,
              help="With --format peft: the version you already have; you get only the update since it.")
@click.option("--format", "fmt", type=click.Choice(["hf", "peft"]), default="hf", show_default=True,
              help="hf: a whole Hugging Face model folder; peft: a PEFT adapter folder (needs --since).")
@click.pass_context
def pull(ctx, out, version, since, fmt) -> None:
    """Download a model version as a Hugging Face folder, or only the update since a version you have.

    A pull whose connection drops is resumed where it stopped (after a wait, a few times); one
    stopped (Ctrl-C) resumes when you run the same command again.
    """
    if fmt == "peft" and since is None:
        _fail("--format peft needs --since VERSION (the version you already have)")
    from nomoat.progress import PullBar

    with _client(ctx) as client, PullBar() as bar:
        number = client.pull(Path(out), version, fmt=fmt, since=since or 0, progress=bar)
    if fmt == "peft":
        click.echo(f"the update from version {since} to version {number} written to {out} "
                   f"(PeftModel.from_pretrained(<version {since}>, {out!r}).merge_and_unload())")
    else:
        click.echo(f"version {number} written to {out}")


@main.group()
def admin() -> None:
    """Change the running model's history (admin token). Every change is a new version."""


@admin.command("rollback", epilog="Example: nomoat admin rollback 3")
@connection_options
@click.argument("version", type=int)
@click.pass_context
def admin_rollback(ctx, version: int) -> None:
    """Make the newest version equal to VERSION (as a new version; history is kept)."""
    with _client(ctx) as client:
        reply = client.rollback(version)
    click.echo(f"version {reply.version} has the weights of version {version}")


@admin.command("unmerge", epilog="Example: nomoat admin unmerge 3f1c0a9e2b7d4c5a6e80")
@connection_options
@click.argument("adapter")
@click.pass_context
def admin_unmerge(ctx, adapter: str) -> None:
    """Remove one adapter's contribution exactly (as a new version)."""
    with _client(ctx) as client:
        reply = client.unmerge(adapter)
    click.echo(f"version {reply.version} no longer contains adapter {adapter}")


@main.group()
def token() -> None:
    """Issue, list and revoke bearer tokens (admin token)."""


@token.command("create", epilog="Example: NOMOAT_TOKEN=$(nomoat token create --role submitter --name alice)")
@connection_options
@click.option("--role", required=True,
              type=click.Choice(["worker", "trusted-worker", "submitter", "reader", "admin"]),
              help="What the token may do: worker (train, outbound-only), trusted-worker (also join the Ray "
                   "cluster: machines you trust only), submitter (submit jobs), reader (status, pull), admin.")
@click.option("--name", default="", help="Who the token is for (shown by `nomoat token list`).")
@click.pass_context
def token_create(ctx, role: str, name: str) -> None:
    """Issue a new token; it is printed once, alone on stdout, and cannot be shown again."""
    with _client(ctx) as client:
        reply = client.create_token(role, name)
    click.echo(reply.token)
    click.echo(f"token id {reply.token_id} ({role}); revoke with: nomoat token revoke {reply.token_id}", err=True)


@token.command("revoke", epilog="Example: nomoat token revoke 9f2c...e1 (a token id from `nomoat token list`)")
@connection_options
@click.argument("token_or_id")
@click.pass_context
def token_revoke(ctx, token_or_id: str) -> None:
    """Revoke a token, given itself or its id. Other coordinators sharing the ledger refuse it within 5 s."""
    with _client(ctx) as client:
        client.revoke_token(token_or_id)
    click.echo("revoked")


@token.command("list", epilog="Example: nomoat token list --json")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def token_list(ctx, as_json: bool) -> None:
    """Every valid token by id (tokens themselves are never stored), with role, name and age."""
    with _client(ctx) as client:
        tokens = client.list_tokens()
    rows = [{"token_id": t.token_id, "role": t.role, "name": t.name, "created": t.created} for t in tokens]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"]))
        click.echo(f"{row['token_id']}  {row['role']:<9}  {created}  {row['name']}")


@main.command(epilog=f"Example: {EXAMPLES['demo']}")
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="Keep everything here.")
@click.option("--listen", default="127.0.0.1:0", help="Coordinator address (port 0: a free one).")
def demo(workdir, listen) -> None:
    """The whole loop on this machine: coordinator, two simulated GPUs, one job, the merged model."""
    from nomoat.demo import run_demo

    started = time.monotonic()
    run_demo(Path(workdir) if workdir else None, listen)
    click.echo(f"demo finished in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
