"""The ``nomoat`` command line: one entry point for every user.

Errors are printed as one sentence and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from nomoat import logs
from nomoat.client import CoordinatorClient, NomoatError, default_address

from nomoat.cli_common import EXAMPLES, client_command, client_of, connection_options, fail
from nomoat.cli_operator import coordinator
from nomoat.cli_roster import volunteer
from nomoat.cli_volunteer import worker


class NomoatGroup(click.Group):
    """Turns NomoatError (and Ctrl-C) into a sentence instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NomoatError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=NomoatGroup)
@click.option("--coordinator", envvar="NOMOAT_COORDINATOR", default=default_address(), show_default=True,
              help="HOST:PORT of the coordinator, or of several of its gateways separated by commas (the next "
                   "is used when one goes) (env NOMOAT_COORDINATOR).")
@click.option("--token", envvar="NOMOAT_TOKEN", default="", help="Bearer token (env NOMOAT_TOKEN).")
@click.option("--tls-ca", envvar="NOMOAT_TLS_CA", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA certificate to verify a coordinator that uses TLS.")
@click.option("--ca-fingerprint", envvar="NOMOAT_CA_FINGERPRINT", default=None, metavar="sha256:HEX",
              help="The coordinator's own CA, as its join line names it: learned from the TLS handshake and "
                   "pinned (no file to copy).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens inside.")
@click.pass_context
def main(ctx: click.Context, coordinator: str, token: str, tls_ca: str | None, ca_fingerprint: str | None,
         verbose: bool) -> None:
    """nomoat: train one shared language model from many people's spare GPUs.

    \b
    Example: nomoat demo
    """
    # Before anything imports transformers: their progress bars are not ours to print.
    logs.quiet_libraries()
    logs.setup("plain", logging.INFO if verbose else logging.WARNING)
    ctx.obj = {"coordinator": coordinator, "token": token, "tls_ca": tls_ca, "ca_fingerprint": ca_fingerprint,
               "verbose": verbose}



main.add_command(coordinator)
main.add_command(worker)
main.add_command(volunteer)


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
    with client_of(ctx) as client:
        reply = client.submit(Path(dataset), name=name, config=config)
        click.echo(f"job {reply.job_id}: {reply.records} records, {reply.tokens} tokens, {reply.tasks} tasks "
                   f"({reply.validation_records} records held out for evaluation)")
        if wait:
            from nomoat.progress import follow

            job = follow(client, reply.job_id, grace_s=give_up_after)
            if job.state == "running" and job.warning:
                fail(f"job {reply.job_id} cannot run on this cluster: {job.warning}. It stays queued; "
                      "`nomoat status` shows when it starts.")
            if job.state != "done":
                fail(f"job {reply.job_id} {job.state}: {job.error or 'see nomoat status'}")
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

    with client_of(ctx) as client:
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
        fail("--format peft needs --since VERSION (the version you already have)")
    from nomoat.progress import PullBar

    with client_of(ctx) as client, PullBar() as bar:
        number = client.pull(Path(out), version, fmt=fmt, since=since or 0, progress=bar)
    if fmt == "peft":
        click.echo(f"the update from version {since} to version {number} written to {out} "
                   f"(PeftModel.from_pretrained(<version {since}>, {out!r}).merge_and_unload())")
    else:
        click.echo(f"version {number} written to {out}")


@main.group()
def admin() -> None:
    """Change the running model's history (admin token). Every change is a new version."""


@client_command(admin, "rollback", "nomoat admin rollback 3")
@click.argument("version", type=int)
def admin_rollback(client: CoordinatorClient, version: int) -> None:
    """Make the newest version equal to VERSION (as a new version; history is kept)."""
    reply = client.rollback(version)
    click.echo(f"version {reply.version} has the weights of version {version}")


@client_command(admin, "unmerge", "nomoat admin unmerge 3f1c0a9e2b7d4c5a6e80")
@click.argument("adapter")
def admin_unmerge(client: CoordinatorClient, adapter: str) -> None:
    """Remove one adapter's contribution exactly (as a new version)."""
    reply = client.unmerge(adapter)
    click.echo(f"version {reply.version} no longer contains adapter {adapter}")


@client_command(admin, "gc", "nomoat admin gc --dry-run")
@click.option("--dry-run", is_flag=True, help="Only say what the retention policy would free.")
def admin_gc(client: CoordinatorClient, dry_run: bool) -> None:
    """Free the blobs and ledger records the retention policy lets go (the coordinator's sweeper
    does this every few minutes); nothing a version, a running job or a rollback needs."""
    reply = client.sweep(dry_run)
    for line in reply.lines:
        click.echo(line)


@main.group()
def token() -> None:
    """Issue, list and revoke bearer tokens (admin token)."""


@client_command(token, "create", "NOMOAT_TOKEN=$(nomoat token create --role submitter --name alice)")
@click.option("--role", required=True,
              type=click.Choice(["worker", "trusted-worker", "submitter", "reader", "admin"]),
              help="What the token may do: worker (train, outbound-only), trusted-worker (also join the Ray "
                   "cluster: machines you trust only), submitter (submit jobs), reader (status, pull), admin.")
@click.option("--name", default="", help="Who the token is for (shown by `nomoat token list`).")
def token_create(client: CoordinatorClient, role: str, name: str) -> None:
    """Issue a new token; it is printed once, alone on stdout, and cannot be shown again."""
    reply = client.create_token(role, name)
    click.echo(reply.token)
    click.echo(f"token id {reply.token_id} ({role}); revoke with: nomoat token revoke {reply.token_id}", err=True)


@client_command(token, "revoke", "nomoat token revoke 9f2c...e1 (a token id from `nomoat token list`)")
@click.argument("token_or_id")
def token_revoke(client: CoordinatorClient, token_or_id: str) -> None:
    """Revoke a token, given itself or its id. Other coordinators sharing the ledger refuse it within 5 s."""
    client.revoke_token(token_or_id)
    click.echo("revoked")


@client_command(token, "list", "nomoat token list --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def token_list(client: CoordinatorClient, as_json: bool) -> None:
    """Every valid token by id (tokens themselves are never stored), with role, name and age."""
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
