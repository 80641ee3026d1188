"""What every ``nomoat`` command shares: the connection options, the client they make, logging
set-up for the long-running commands, and errors as one sentence."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import click

from nomoat import logs
from nomoat.client import CoordinatorClient

EXAMPLES = {
    "coordinator": "nomoat coordinator start --data-dir ./nomoat-data --listen 0.0.0.0:50051",
    "worker": "nomoat worker start --coordinator HOST:50051 --simulate-gpu 'RTX 3060:12'",
    "submit": "nomoat submit data.jsonl --name chat-v1 --wait",
    "status": "nomoat status j-1a2b3c4d --json",
    "pull": "nomoat pull --out ./model   |   nomoat pull --since 3 --format peft --out ./update",
    "demo": "nomoat demo",
}


def fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _remember(key: str):
    def callback(ctx: click.Context, param: click.Parameter, value):
        if value is not None:
            ctx.obj[key] = value
        return value

    return callback


def connection_options(command):
    """--coordinator/--token/--tls-ca/--ca-fingerprint also after the command name (`nomoat worker start
    --coordinator ...`)."""
    for name, key, help_text in (
        ("--ca-fingerprint", "ca_fingerprint", "The coordinator's CA fingerprint (sha256:...), as its join line "
                                               "names it (default: NOMOAT_CA_FINGERPRINT)."),
        ("--tls-ca", "tls_ca", "CA certificate of a coordinator that uses TLS."),
        ("--token", "token", "Bearer token (default: NOMOAT_TOKEN)."),
        ("--coordinator", "coordinator", "HOST:PORT of the coordinator (default: NOMOAT_COORDINATOR)."),
    ):
        command = click.option(name, default=None, expose_value=False, is_eager=True,
                               callback=_remember(key), help=help_text)(command)
    return command


def client_of(ctx: click.Context) -> CoordinatorClient:
    o = ctx.obj
    return CoordinatorClient(o["coordinator"], o["token"], o["tls_ca"], o.get("ca_fingerprint"))


def client_command(group: click.Group, name: str, example: str) -> Callable[[Callable[..., None]], click.Command]:
    """A command of ``group`` that talks to the coordinator with the connection options: the
    decorated function gets a connected client first, then its own arguments and options (the
    admin, token and volunteer commands are all this shape)."""
    def wrap(body: Callable[..., None]) -> click.Command:
        @functools.wraps(body)
        def command(ctx: click.Context, *args, **kwargs) -> None:
            with client_of(ctx) as client:
                body(client, *args, **kwargs)

        return group.command(name, epilog=f"Example: {example}")(connection_options(click.pass_context(command)))

    return wrap



def log_format_option(command):
    """--log-format for the long-running commands: they log one line per state change."""
    return click.option(
        "--log-format", type=click.Choice(logs.FORMATS), default="plain", show_default=True,
        envvar="NOMOAT_LOG_FORMAT",
        help="plain: sentences; json: one JSON object a line (ts, level, logger, event, message, job/task/"
             "worker/version ids).")(command)


def start_logging(ctx: click.Context, fmt: str) -> None:
    logs.setup(fmt, logging.DEBUG if ctx.find_root().obj.get("verbose") else logging.INFO)


