"""``nomoat volunteer list|ban|clear|rotate-join-code``: the operator's roster of volunteers (admin token).

A volunteer is an identity minted when someone joins with the join code, or a worker token an
admin made; its workers, trust and credit are its own (docs/trust.md).
"""

from __future__ import annotations

import json
import time

import click

from nomoat.cli_common import client_command
from nomoat.client import CoordinatorClient


@click.group()
def volunteer() -> None:
    """List, ban or pardon volunteers, and rotate the join code (admin token)."""


@client_command(volunteer, "list", "nomoat volunteer list --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def volunteer_list(client: CoordinatorClient, as_json: bool) -> None:
    """Every volunteer: id, name, workers, and where its trust stands."""
    rows = client.list_volunteers()
    if as_json:
        from google.protobuf.json_format import MessageToDict

        click.echo(json.dumps([MessageToDict(v, always_print_fields_with_no_presence=True) for v in rows], indent=2))
        return
    if not rows:
        click.echo("no volunteers yet")
    for v in rows:
        joined = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.joined))
        workers = f"{v.active_workers}/{len(v.worker_ids)} workers active"
        click.echo(f"{v.volunteer_id[:16]}  {v.standing:<9}  {joined}  {workers}  {v.name}"
                   + (f"\n    {v.reason}" if v.reason else ""))


@client_command(volunteer, "ban", "nomoat volunteer ban 3f1c0a9e2b7d4c5a")
@click.argument("volunteer_id")
def volunteer_ban(client: CoordinatorClient, volunteer_id: str) -> None:
    """Refuse a volunteer's credential from now on, and give its leases back to the queue.

    VOLUNTEER_ID: its id as `nomoat volunteer list` shows it (a unique prefix), or a worker id.
    """
    reply = client.ban_volunteer(volunteer_id)
    click.echo(f"volunteer {reply.volunteer_id[:16]} is banned; {reply.leases_dropped} of its leases go back to the queue")


@client_command(volunteer, "clear", "nomoat volunteer clear 3f1c0a9e2b7d4c5a")
@click.argument("volunteer_id")
def volunteer_clear(client: CoordinatorClient, volunteer_id: str) -> None:
    """Forget a volunteer's trust record (a pardon): one the join code minted starts over on probation."""
    reply = client.clear_volunteer(volunteer_id)
    click.echo(f"the trust record of volunteer {reply.volunteer_id[:16]} is cleared")


@client_command(volunteer, "rotate-join-code", "nomoat volunteer rotate-join-code")
def volunteer_rotate(client: CoordinatorClient) -> None:
    """A new join code, printed once alone on stdout; the old one stops working, volunteers who
    joined with it keep working."""
    code = client.rotate_join_code()
    click.echo(code)
    click.echo("the previous join code no longer works; give out join lines with this one "
               "(the coordinator's data dir keeps it in join.code)", err=True)
