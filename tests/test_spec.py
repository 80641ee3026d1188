"""What crosses from the coordinator to a worker's task and back is plain, checked data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from nomoat import raynode
from nomoat.card import Card, from_message, to_message
from nomoat.spec import LoraConfig, NeedsBiggerCard, SpecError, TaskSpec, TrainConfig, UnitResult
from worker.probe import parse_simulated
from worker.settings import NodeSettings

CARD = Card("NVIDIA GeForce RTX 3060", 11.76, 11.2, "8.6", True, True, "cuda", 12.7)
SPEC = TaskSpec(
    task_id="j-1.3", job_id="j-1", fence=7, base_version=2, tokens=32768, coordinator="10.0.0.5:50051",
    token="nmt_x", lora=LoraConfig(8, 16.0, ("q_proj", "v_proj")),
    train=TrainConfig(seq_len=128, batch_size=8, learning_rate=2e-3, epochs=1, seed=3, plan_model="llama-3.2-1b"),
    lease_ttl_s=90.0, worker_id="w-1a2b3c4d", card=CARD,
)


def test_a_spec_survives_json_and_pickle_unchanged() -> None:
    as_json = json.loads(json.dumps(SPEC.to_dict()))
    assert TaskSpec.from_dict(as_json) == SPEC
    assert as_json["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert as_json["card"]["vram_gb"] == 11.76
    assert pickle.loads(pickle.dumps(SPEC)) == SPEC  # how Ray carries it
    unit = UnitResult("j-1.3", 7, "NeedsBiggerCard: ...", needs_vram_gb=11.77)
    assert UnitResult.from_dict(json.loads(json.dumps(unit.to_dict()))) == unit


def test_a_spec_without_a_card_leaves_the_node_to_probe_its_own() -> None:
    data = {**SPEC.to_dict(), "card": None}
    data.pop("worker_id")
    spec = TaskSpec.from_dict(data)
    assert spec.card is None and spec.worker_id == ""


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.pop("fence"), "task spec lacks the field fence"),
    (lambda d: d.update(fence="7"), "task spec field fence must be int, not '7'"),
    (lambda d: d.update(fence=True), "task spec field fence must be int, not True"),
    (lambda d: d["lora"].update(target_modules="q_proj"), "field target_modules must be a list"),
    (lambda d: d["train"].update(learning_rate=None), "field learning_rate must be float, not None"),
    (lambda d: d["card"].update(bf16="yes"), "field bf16 must be bool"),
    (lambda d: d.update(script="import os"), "unknown field(s) script"),
    (lambda d: d.update(lora=[8, 16.0]), "field lora must be a mapping"),
])
def test_a_malformed_spec_is_refused_naming_the_field(change, problem) -> None:
    data = json.loads(json.dumps(SPEC.to_dict()))
    change(data)
    with pytest.raises(SpecError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        TaskSpec.from_dict(data)


def test_needing_a_bigger_card_carries_the_vram_as_a_number() -> None:
    exc = NeedsBiggerCard.than(6.0, "out of memory even at micro-batch 1 on GTX 1650")
    assert exc.vram_gb == 6.01
    assert str(exc) == "out of memory even at micro-batch 1 on GTX 1650; it needs a card with more than 6 GB"


@pytest.mark.parametrize("card", [CARD, parse_simulated("RTX 4090:24:82.6"), parse_simulated("GTX 1650:6")])
def test_a_card_is_the_same_after_registering_it(card: Card) -> None:
    """What the scheduler reads back from the ledger's worker record is the card the task plans
    for: the same card the probe made, but for the free VRAM of a card at rest."""
    back = from_message(type(to_message(card)).FromString(to_message(card).SerializeToString()))
    assert back == Card(**{**card.__dict__, "free_vram_gb": card.vram_gb})


def test_node_settings_reach_the_task_through_the_nodes_environment(tmp_path: Path) -> None:
    node = NodeSettings(cache_dir=tmp_path / "cache", token="nmt_own", tls_ca="/etc/nomoat/ca.pem", torch_threads=2)
    assert NodeSettings.from_env(node.env()) == node
    hooks = {**node.env(), "NOMOAT_INJECT_OOM_ABOVE_MICRO_BATCH": "0", "NOMOAT_SIMULATED_TOKENS_PER_TFLOP": "20"}
    read = NodeSettings.from_env(hooks)
    assert read.inject_oom_above == 0 and read.simulated_tokens_per_tflop == 20.0


# -- the token of a Ray cluster the operator started ------------------------------------------------


def test_the_operators_ray_token_is_found_where_ray_looks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    named = tmp_path / "named"
    named.write_text("from-path-env\n")
    given = tmp_path / "given"
    given.write_text("from-file\n")
    env = {"HOME": str(home)}
    assert raynode.operator_token(None, env) == "from-home"
    assert raynode.operator_token(None, {**env, "RAY_AUTH_TOKEN_PATH": str(named)}) == "from-path-env"
    assert raynode.operator_token(None, {**env, "RAY_AUTH_TOKEN": "from-env"}) == "from-env"
    assert raynode.operator_token(given, {**env, "RAY_AUTH_TOKEN": "from-env"}) == "from-file"


def test_no_ray_token_or_a_bad_token_file_is_a_sentence(tmp_path: Path) -> None:
    with pytest.raises(raynode.RayClusterError, match="no token for the Ray cluster was found: pass the file "
                                                      "that holds it with --ray-token-file, or set RAY_AUTH_TOKEN"):
        raynode.operator_token(None, {"HOME": str(tmp_path)})
    with pytest.raises(raynode.RayClusterError, match="cannot read the Ray token file .*missing"):
        raynode.operator_token(tmp_path / "missing", {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(raynode.RayClusterError, match="the Ray token file .* is empty"):
        raynode.operator_token(tmp_path / "empty", {})


def test_an_unreachable_ray_cluster_is_a_sentence() -> None:
    port = raynode.free_port()
    with pytest.raises(raynode.RayClusterError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        raynode.check_token(f"127.0.0.1:{port}", "whatever", timeout=2.0)
