"""The worker's uploader against the real gRPC server (tests/rig.py): a refusal of the worker's
token ends the upload at once, with a sentence in the worker's log; an error that waiting can
change (the coordinator away) is retried for the upload's patience."""

from __future__ import annotations

import logging
import socket

import pytest

from coordinator.gateway.auth import hash_token
from nomoat.client import CoordinatorClient, NomoatError
from tests.rig import SECRET, Rig, make_adapter, published, rig  # noqa: F401  (fixtures)
from worker import uploader

# Long enough that an upload still retrying when the test ends could not have finished under it.
PATIENCE_S = 120.0


def _leased_upload(rig: Rig) -> tuple[bytes, object]:
    """A task of a new job leased as the scheduler does, and its adapter's manifest."""
    job_id = rig.submit().job_id
    task_id = rig.ledger.tasks.ids(job_id)[0]
    fence = rig.lease(task_id)
    data = make_adapter(rig.deps.shapes)
    return data, uploader.manifest_for(task_id, fence, 0, 8, 16.0, 300, 2.5, data, lease_secret=SECRET)


def test_a_token_that_may_not_upload_ends_the_upload_at_once(rig: Rig, caplog) -> None:
    data, manifest = _leased_upload(rig)
    with caplog.at_level(logging.WARNING, logger="nomoat.uploader"):
        sent = uploader.upload(rig.client("reader"), manifest, data, patience_s=PATIENCE_S, backoff_s=5.0)
    assert not sent.accepted and sent.attempts == 1, sent
    assert "a reader token may not call" in sent.reason
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"refused the upload of task {manifest.task_id} for good" in line and "not retried" in line
    assert rig.ledger.tasks.get(manifest.task_id).state == "leased"  # nothing was taken


def test_a_revoked_token_a_ban_ends_the_upload_at_once(rig: Rig, caplog) -> None:
    data, manifest = _leased_upload(rig)
    token = rig.registry.create("worker", "mallory")
    client = rig.client(token=token)
    assert client.upload_offset(manifest.task_id, manifest.fence, manifest.sha256, secret=SECRET) == 0
    rig.registry.revoke(token)
    assert rig.registry.tokens.revoked(hash_token(token))
    with caplog.at_level(logging.WARNING, logger="nomoat.uploader"):
        sent = uploader.upload(client, manifest, data, patience_s=PATIENCE_S, backoff_s=5.0)
    assert not sent.accepted and sent.attempts == 1, sent
    assert "revoked" in sent.reason
    assert any("for good" in r.getMessage() for r in caplog.records)


def test_a_coordinator_that_does_not_answer_is_retried(caplog) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    data = b"x" * 64
    manifest = uploader.manifest_for("t-1", 1, 0, 8, 16.0, 300, 2.5, data)
    with CoordinatorClient(address, token="t") as client, caplog.at_level(logging.WARNING, logger="nomoat.uploader"):
        with pytest.raises(NomoatError, match="cannot reach the coordinator"):
            uploader.upload(client, manifest, data, patience_s=1.5, backoff_s=0.1, max_backoff_s=0.2)
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) >= 2 and not any("for good" in r.getMessage() for r in caplog.records)
