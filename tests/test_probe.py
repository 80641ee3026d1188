"""The device probe, simulated cards, and what a card advertises to Ray."""

from __future__ import annotations

import pytest
from ray._private.label_utils import validate_node_label_syntax

from worker.probe import (
    Card,
    ProbeError,
    label_value,
    parse_simulated,
    probe,
    ray_labels,
    ray_resources,
    tflops_estimate,
)


def test_probe_on_this_cpu_machine_returns_a_cpu_card():
    card = probe()
    assert isinstance(card, Card)
    assert card.backend == "cpu"
    assert not card.simulated and not card.bf16
    assert card.compute_capability == ""
    assert 0 < card.free_vram_gb <= card.vram_gb
    assert card.tflops > 0


def test_probe_of_a_missing_gpu_says_so():
    with pytest.raises(ProbeError, match="no CUDA device"):
        probe(3)


@pytest.mark.parametrize(
    "spec, name, vram, tflops",
    [
        ("RTX 3060:12", "RTX 3060", 12.0, 12.7),
        ("RTX 4090:24:82", "RTX 4090", 24.0, 82.0),
        (" GTX 1660 Ti : 6 ", "GTX 1660 Ti", 6.0, 10.9),
        ("My Card:7.5:3.25", "My Card", 7.5, 3.25),
    ],
)
def test_parse_simulated_good_specs(spec, name, vram, tflops):
    card = parse_simulated(spec)
    assert (card.name, card.vram_gb, card.free_vram_gb, card.tflops) == (name, vram, vram, tflops)
    assert card.simulated and card.backend == "cpu" and not card.bf16


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "field"),
        ("RTX 3060", "1 field"),
        ("RTX 3060:12:30:extra", "4 field"),
        (":12", "empty name"),
        ("RTX 3060:twelve", "not a number"),
        ("RTX 3060:12:fast", "not a number"),
        ("RTX 3060:0", "positive"),
        ("RTX 3060:-4", "positive"),
        ("RTX 3060:nan", "positive"),
        ("RTX 3060:12:0", "positive"),
        ("RTX 3060:120000", "more than any card"),
    ],
)
def test_parse_simulated_bad_specs_name_the_problem(spec, problem):
    with pytest.raises(ProbeError, match=problem):
        parse_simulated(spec)


@pytest.mark.parametrize(
    "card",
    [
        parse_simulated("NVIDIA GeForce RTX 3060 Laptop GPU:6"),
        parse_simulated("weird///name (rev. 2)!:8"),
        parse_simulated("-" * 100 + "x" * 100 + ":8"),
        Card("NVIDIA GeForce RTX 4090", 23.99, 22.5, "8.9", True, True, "cuda", 82.6),
    ],
)
def test_ray_labels_are_valid_ray_labels(card):
    labels = ray_labels(card)
    validate_node_label_syntax(labels)  # Ray's own check; raises ValueError when invalid
    assert labels["nomoat/backend"] == card.backend
    assert labels["nomoat/bf16"] in ("true", "false")
    assert labels["nomoat/card"]


def test_label_value_slugs_card_names():
    assert label_value("NVIDIA GeForce RTX 3060") == "NVIDIA-GeForce-RTX-3060"
    assert label_value("  ..odd__ ") == "odd"


def test_ray_resources_advertise_worker_and_vram():
    card = Card("NVIDIA GeForce RTX 4090", 23.999, 22.5, "8.9", True, True, "cuda", 82.6)
    assert ray_resources(card) == {"nomoat_worker": 1.0, "vram_gb": 23.99}


@pytest.mark.parametrize(
    "name, capability, expected",
    [
        ("NVIDIA GeForce RTX 4090", "8.9", 82.6),
        ("NVIDIA GeForce RTX 3060", "8.6", 12.7),
        ("NVIDIA GeForce RTX 3060 Ti", "8.6", 16.2),
        ("NVIDIA RTX A4000", "8.6", 76.7),
        ("NVIDIA GeForce RTX 2060", "7.5", 25.8),
        ("NVIDIA GeForce RTX 3060 Laptop GPU", "8.6", round(12.7 * 0.65, 1)),
        ("Some Future Card", "8.9", 40.0),
        ("Some Future Card", "", 10.0),
    ],
)
def test_tflops_estimate(name, capability, expected):
    assert tflops_estimate(name, capability) == expected


def test_a_simulated_card_never_claims_to_load_a_4bit_base():
    # It trains on the CPU, where the trainer has no 4-bit path (worker.task.memory_plan).
    card = parse_simulated("RTX 3060:12")
    assert not card.loads_4bit and ray_labels(card)["nomoat/loads-4bit"] == "false"


@pytest.mark.parametrize("loads_4bit", [True, False])
def test_what_a_node_advertises_is_what_placement_reads(loads_4bit):
    from coordinator.schedule.ray_dispatch import node_of

    # Fake: a CUDA card (none here); loads_4bit as worker.probe finds it with bitsandbytes or without.
    card = Card("NVIDIA GeForce RTX 2060", 6.0, 5.5, "7.5", False, True, "cuda", 25.8, loads_4bit=loads_4bit)
    labels = {**ray_labels(card), "nomoat/worker-id": "w-1"}
    validate_node_label_syntax(labels)
    entry = {"NodeID": "n1", "Alive": True, "Resources": {**ray_resources(card), "CPU": 1.0}, "Labels": labels}
    node = node_of(entry, busy=set())
    assert (node.vram_gb, node.worker_id, node.loads_4bit, node.busy) == (6.0, "w-1", loads_4bit, False)
    assert node_of({**entry, "Alive": False}, set()) is None
    assert node_of({**entry, "Resources": {"CPU": 1.0}}, set()) is None  # the head, or not ours
