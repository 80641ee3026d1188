"""The volunteer's credential: minted once when it joins with the join code, kept, reused.

The public join line carries a join code, which may only register. The first registration
with it makes this user a volunteer of that coordinator: the reply carries a credential of its
own (coordinator.schedule.roster), which is kept in the user's config dir
(``~/.config/nomoat/credentials/``, mode 0600), one file per coordinator (named by its CA's
fingerprint, or its address when it has none). Every later start, and every other card this
user runs, registers with the kept credential instead, so one person's cards are one volunteer
with one trust record, and a restart is the same volunteer. A file lock keeps two workers
starting at once from minting two identities.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nomoat.client import CoordinatorClient, NomoatError
from nomoat.userconfig import config_dir, write_private
from nomoat.v1 import nomoat_pb2 as pb

log = logging.getLogger("nomoat.credentials")
# What a join code looks like (coordinator.ledger.tokens makes tokens "nmt_<role's initial>_..."):
# only a join code is swapped for a volunteer credential; any other token is used as it is.
JOIN_PREFIX = "nmt_j_"
REVOKED = "the operator revoked it"  # how the coordinator says a token was revoked (coordinator.gateway.auth)


def is_join_code(token: str) -> bool:
    return token.startswith(JOIN_PREFIX)


class Credentials:
    """The credential kept for one coordinator."""

    def __init__(self, address: str, fingerprint: str = "", root: Path | None = None) -> None:
        self.address = address
        self.fingerprint = fingerprint
        key = hashlib.sha256((fingerprint or address).encode()).hexdigest()[:24]
        self.path = (root or config_dir()) / "credentials" / f"{key}.json"

    def load(self) -> str:
        """The kept credential; "" when there is none."""
        try:
            return str(json.loads(self.path.read_text())["credential"])
        except (OSError, ValueError, KeyError):
            return ""

    def save(self, credential: str, volunteer_id: str) -> None:
        record = {"coordinator": self.address, "ca_fingerprint": self.fingerprint, "credential": credential,
                  "volunteer_id": volunteer_id}
        write_private(self.path, (json.dumps(record, indent=1) + "\n").encode())

    @contextmanager
    def lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def register(client: CoordinatorClient, credentials: Credentials | None, name: str, card: pb.Card,
             worker_id: str = "", join_code: str = "") -> pb.RegisterReply:
    """Register as this user's volunteer. With a ``join_code``: the kept credential if there is
    one, else the one the coordinator mints now (kept at once). The client carries the credential
    from then on. Raises NomoatError (a sentence) when the coordinator refuses."""
    if not join_code or credentials is None:
        return client.register(name, card, worker_id=worker_id)
    with credentials.lock():
        kept = credentials.load()
        if kept:
            client.token = kept
            try:
                return client.register(name, card, worker_id=worker_id)
            except NomoatError as exc:
                if "refused the token" not in str(exc):
                    raise
                if REVOKED in str(exc):
                    raise NomoatError(f"the coordinator refused this volunteer's credential (kept in "
                                      f"{credentials.path}): the operator banned it. Ask the operator why; deleting "
                                      "that file would join again as a new volunteer, on probation.") from None
                # Unknown to it: a coordinator with a new ledger at the same address. Join anew.
                log.warning("the coordinator does not know this volunteer's credential (a new ledger?); "
                            "joining again as a new volunteer")
        client.token = join_code
        reply = client.register(name, card)
        if reply.credential:
            credentials.save(reply.credential, reply.volunteer_id)
            client.token = reply.credential
            log.info("joined as volunteer %s; its credential is kept in %s", reply.volunteer_id[:12], credentials.path)
        return reply
