"""``nomoat coordinator start``: the operator's command. Its options show the coordinator's
settings, so the coordinator's modules are imported only when this command is the one asked for."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click

from nomoat.cli_common import EXAMPLES, fail, log_format_option, start_logging


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
    from coordinator.settings import ROLES, JobDefaults, Settings

    @click.command("start", epilog=f"Example: {EXAMPLES['coordinator']}")
    @click.option("--data-dir", default="./nomoat-data", show_default=True, type=click.Path(file_okay=False))
    @click.option("--role", default="all", show_default=True, type=click.Choice(ROLES),
                  help="What this process does: all; gateway (gRPC and HTTP only, run several behind a load "
                       "balancer); scheduler or folder (that loop only, one leads at a time, the rest stand by). "
                       "Processes of one coordinator share --redis-url and the blob store.")
    @click.option("--leader-ttl", default=Settings.leader_ttl_s, show_default=True, type=click.FloatRange(min=0.5),
                  help="Seconds a scheduler's or folder's leader lease lasts: a standby takes over about this "
                       "long after its leader dies.")
    @click.option("--listen", default="127.0.0.1:50051", show_default=True, help="gRPC address to listen on.")
    @click.option("--public-address", default="", help="HOST:PORT volunteers use to reach this coordinator.")
    @click.option("--redis-url", default=None, envvar="NOMOAT_REDIS_URL",
                  help="External Redis 6.2+/Valkey (redis://:PASSWORD@HOST:PORT/0), or behind Sentinel "
                       "(redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT]/MASTERNAME[/DB]: it follows a "
                       "failover, and versions and accepted adapters wait until a replica holds them); "
                       "default: an embedded redis-server. Its password stays out of argv when it comes "
                       "from NOMOAT_REDIS_URL or --redis-url-file.")
    @click.option("--redis-url-file", default=None, type=click.Path(exists=True, dir_okay=False),
                  help="A file holding the --redis-url (keep it mode 0600).")
    @click.option("--store", default="",
                  help="The blob store: s3://BUCKET/PREFIX for any S3-compatible object store (credentials "
                       "from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or a profile; clients then move "
                       "model bytes by presigned URLs); default: DATA_DIR/blobs.")
    @click.option("--store-endpoint", default="",
                  help="The object store's URL for --store s3://, e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO, "
                       "R2); default: AWS_ENDPOINT_URL or a profile's endpoint_url, else AWS S3.")
    @click.option("--ray-address", default=None,
                  help="Existing Ray cluster (HEAD:PORT); default: start a head; 'off': no Ray, outbound "
                       "volunteers only.")
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
    @click.option("--insecure-plaintext", is_flag=True,
                  help="Serve plain gRPC beyond loopback (default: TLS by the coordinator's own CA). Only on a "
                       "network protected otherwise, such as a Kubernetes cluster's.")
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
    @click.option("--shard-sigmas", default=Settings.shard_sigmas, show_default=True, type=click.FloatRange(min=0),
                  help="The shard proof's margin in paired standard errors: an adapter must have learned from "
                       "its own shard (docs/trust.md); 0 turns it off.")
    @log_format_option
    @click.pass_context
    def coordinator_start(ctx, data_dir, role, leader_ttl, listen, public_address, redis_url, redis_url_file, store,
                          store_endpoint,
                          ray_address, ray_token_file, ray_node_ip, base_model, fold_every, fold_timeout,
                          tokens_per_task, outer_momentum, outer_lr, keep_global_batch, size_from_noise, lease_ttl,
                          max_attempts, max_workers_per_token, replicate_fraction, tls_cert, tls_key,
                          insecure_plaintext, http, device, eval_tokens, eval_dtype, eval_on, eval_timeout,
                          shard_sigmas, log_format) -> None:
        """Start the coordinator: gRPC server, Redis ledger and Ray driver. Ctrl-C stops it."""
        # OpenMP threads that sleep when idle, not spin (read when torch loads, just below): the
        # coordinator's evaluations share the CPU with its gRPC threads and Redis, and spinning
        # threads stalled an evaluation 9x on two shared cores (0.36 s against 0.04 s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from coordinator.model.store import StoreError
        from coordinator.server import Coordinator
        from nomoat.raynode import RayClusterError, RayNodeError

        start_logging(ctx, log_format)

        if redis_url_file:
            redis_url = Path(redis_url_file).read_text().strip()
        if bool(tls_cert) != bool(tls_key):
            fail("--tls-cert and --tls-key go together")
        if ray_token_file and (not ray_address or ray_address == "off"):
            fail("--ray-token-file is the token of the cluster that --ray-address names; pass both")
        http = "" if http.lower() in ("off", "") else http
        host, _, port = http.rpartition(":")
        if http and (not host or not port.isdigit()):
            fail(f"--http {http}: give HOST:PORT, such as {DASHBOARD}, or 'off'")
        settings = Settings(
            data_dir=Path(data_dir).resolve(), role=role, leader_ttl_s=leader_ttl, listen=listen,
            public_address=public_address, redis_url=redis_url, store=store, store_endpoint=store_endpoint,
            ray_address=ray_address, ray_token_file=ray_token_file, ray_node_ip=ray_node_ip, base_model=base_model,
            fold_every=fold_every, fold_timeout_s=fold_timeout, job=JobDefaults(tokens_per_task=tokens_per_task),
            outer_momentum=outer_momentum, outer_lr=outer_lr, keep_global_batch=keep_global_batch,
            size_from_noise=size_from_noise, lease_ttl_s=lease_ttl, max_attempts=max_attempts,
            max_workers_per_token=max_workers_per_token, replicate_fraction=replicate_fraction,
            tls_cert=tls_cert, tls_key=tls_key, insecure_plaintext=insecure_plaintext, http=http, device=device,
            eval_tokens=eval_tokens, eval_dtype=eval_dtype, eval_on=eval_on, eval_timeout_s=eval_timeout,
            shard_sigmas=shard_sigmas,
        )
        node = Coordinator(settings)
        try:
            click.echo(f"starting the coordinator in {settings.data_dir} ...")
            node.start()
            if not settings.serves:
                click.echo(f"coordinator {role} started: it runs while it leads the {role} (one process at a time; "
                           f"a standby takes over within {leader_ttl:g} s). Ctrl-C stops it.")
                wait_for_signal()
                return
            ray = f"Ray cluster at {node.ray_address}" if node.ray_address else "no Ray (outbound volunteers only)"
            click.echo(f"coordinator listening on {listen}{'' if role == 'all' else ' (gateway)'}; {ray}")
            if node.ca_fingerprint:
                click.echo(f"gRPC uses TLS with this coordinator's own CA, {node.ca_fingerprint} "
                           "(clients pin it with --ca-fingerprint; nothing to copy)")
            click.echo(f"admin token: {settings.data_dir / 'admin.token'} (keep it secret); as the admin:\n  "
                       + node.admin_connection())
            # The join code is shown once, when it is made; later starts read it from the data dir.
            click.echo("volunteers join with (outbound-only; no Ray, no open port; each one becomes a volunteer "
                       "of its own):\n  " + node.join_command(show_code=node.join_code_new))
            if node.ray_address:
                click.echo("trusted machines only (Ray mode; its token runs code on every node, never share it):\n  "
                           + node.trusted_join_command())
            say_dashboard(node, explicit=ctx.get_parameter_source("http") is not click.core.ParameterSource.DEFAULT)
            wait_for_signal()
        except (RayClusterError, RayNodeError, StoreError) as exc:  # an operator's cluster, the head we start, --store
            fail(str(exc))
        finally:
            click.echo("shutting down ...")
            node.stop()

    return coordinator_start


DASHBOARD = "127.0.0.1:8470"  # the coordinator's HTTP port unless --http says otherwise


def say_dashboard(node, explicit: bool) -> None:
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
            fail(f"{node.web_error}; choose another --http HOST:PORT, or --http off")
        click.secho(f"warning: {node.web_error}; no dashboard (choose one with --http HOST:PORT)", fg="yellow",
                    err=True)


@click.group(cls=LazyGroup, factories={"start": _coordinator_start})
def coordinator() -> None:
    """Run the coordinator (operators)."""


def wait_for_signal() -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


