"""``nomoat worker start|pause|resume|stats``: the volunteer's commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nomoat.cli_common import EXAMPLES, client_of, connection_options, fail, log_format_option, start_logging


@click.group()
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

    start_logging(ctx, log_format)
    if (ray_address or node_ip) and not ray_mode:
        fail("--ray-address and --node-ip are for Ray mode; add --ray (it needs a trusted-worker token), "
              "or leave them out to run outbound-only")
    try:
        card = parse_simulated(simulate_gpu) if simulate_gpu else probe()
    except ProbeError as exc:
        fail(str(exc))
    cache = Path(cache_dir) if cache_dir else None
    try:
        settings = _control_settings(cache, idle_only, hours, max_power, max_upload_mbps)
        controls = Controls(settings, gpu=find_gpu() if (idle_only or max_power) else NoGpu())
        power_note = controls.limit_power()
    except ControlError as exc:
        fail(str(exc))
    if ray_mode:
        from worker.agent import WorkerAgent

        agent = WorkerAgent(client_of(ctx), card, name=name, ray_address=ray_address, cache_dir=cache,
                            threads=threads, node_ip=node_ip, tls_ca=ctx.obj["tls_ca"], controls=controls)
        joined, left = "joined the Ray cluster", "worker left the cluster"
    else:
        from worker.outbound import OutboundWorker

        agent = OutboundWorker(client_of(ctx), card, name=name, cache_dir=cache, threads=threads,
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
        fail(str(exc))
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
    with client_of(ctx) as client:
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


