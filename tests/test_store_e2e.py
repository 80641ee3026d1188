"""Done-when of issue 20: a job end to end with ``--store s3://...`` against a real SeaweedFS, as
whole processes (a coordinator, an outbound volunteer, `nomoat pull`), and not one byte of the
model, a shard or an adapter through the coordinator's gateway (its byte counter stays at 0)."""

from __future__ import annotations

import json
import uuid

import pytest

from tests import procs
from tests.seaweed import use
from tests.test_faults import cluster_factory, token  # noqa: F401  (fixture)
from tests.test_outbound_e2e import add_outbound, done

pytestmark = pytest.mark.slow


def test_a_job_runs_end_to_end_through_an_object_store(cluster_factory, seaweed, monkeypatch, tmp_path) -> None:
    use(seaweed, monkeypatch)  # the coordinator's credentials: the standard AWS variables; the worker needs none
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the store's URL comes from --store-endpoint (the settings)
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster = cluster_factory("--fold-every", "2", "--store", f"s3://nomoat-test/{prefix}",
                              "--store-endpoint", seaweed.endpoint)
    add_outbound(cluster, "home-a")
    job_id = cluster.submit(lines=120, tokens_per_task=1500)
    done(cluster, job_id, timeout=600)
    out = tmp_path / "pulled"
    pulled = procs.run(["--coordinator", cluster.address, "--token", token(cluster.data_dir, "reader"),
                        "pull", "--out", str(out)], {}, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    latest = cluster.ledger.versions.latest()
    assert latest >= 1 and f"version {latest} written" in pulled.stdout
    card = json.loads((out / "nomoat.json").read_text())
    assert card["version"] == latest and card["jobs"][0]["job_id"] == job_id
    assert card["contributors"] and card["contributors"][0]["worker"] == "home-a"
    assert "home-a" in (out / "README.md").read_text()
    # Every byte went between the store and the clients: the gateway moved none.
    assert cluster.ledger.counters.tally().gateway_bytes == {"pull": 0, "shard": 0, "upload": 0}
    assert not any((cluster.data_dir / "blobs").rglob("*")) if (cluster.data_dir / "blobs").exists() else True
    keys = [o["Key"] for page in seaweed.client().get_paginator("list_objects_v2").paginate(
        Bucket="nomoat-test", Prefix=prefix) for o in page.get("Contents", ())]
    assert any("/blobs/" in k for k in keys) and not any("/uploads/" in k for k in keys)
