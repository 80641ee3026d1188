"""Submit: splitting into tasks, resolving a job's config, and the all-or-nothing submit()."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.settings import JobDefaults, Settings
from coordinator.model.store import BlobStore
from coordinator.schedule.submit import JobConfig, read_records, records_blob, resolve_config, split_tasks, submit
from nomoat.records import DatasetError
from nomoat.tiny import read_fortunes, train_tokenizer

MODULES = [f"model.layers.{i}.{part}.{name}" for i in range(2)
           for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj")))
           for name in names] + ["lm_head"]
UNSET = {"lora_rank": 0, "lora_alpha": 0.0, "target_modules": [], "seq_len": 0, "learning_rate": 0.0,
         "batch_size": 0, "epochs": 0, "tokens_per_task": 0}


# -- split_tasks ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("counts", "per_task", "expected"), [
    pytest.param([10] * 9, 30, [(0, 3), (3, 6), (6, 9)], id="exact"),
    pytest.param([10] * 10, 30, [(0, 3), (3, 6), (6, 10)], id="small-tail-joins-last"),
    pytest.param([10] * 11, 30, [(0, 3), (3, 6), (6, 9), (9, 11)], id="tail-of-half-stays"),
    pytest.param([5], 100, [(0, 1)], id="single-small-record"),
    pytest.param([1000], 100, [(0, 1)], id="single-huge-record"),
    pytest.param([3, 4, 5], 1000, [(0, 3)], id="all-below-one-task"),
    pytest.param([50, 1, 1, 1, 50, 1], 50, [(0, 1), (1, 6)], id="uneven"),
    pytest.param([50, 1, 1, 1, 50, 30], 50, [(0, 1), (1, 5), (5, 6)], id="uneven-big-tail"),
    pytest.param([], 100, [], id="empty"),
])
def test_split_tasks(counts: list[int], per_task: int, expected: list[tuple[int, int]]) -> None:
    assert split_tasks(counts, per_task) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=60), st.integers(1, 2000))
def test_split_tasks_covers_every_record_once(counts: list[int], per_task: int) -> None:
    ranges = split_tasks(counts, per_task)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end == start  # contiguous, no gaps, no overlap
    assert all(start < end for start, end in ranges)
    sizes = [sum(counts[s:e]) for s, e in ranges]
    # Every task but the last reaches the target; the last one holds at least half of it (or is the only one).
    assert all(size >= per_task for size in sizes[:-1])
    assert len(ranges) == 1 or sizes[-1] >= per_task // 2


# -- resolve_config -------------------------------------------------------------------------------

def test_unset_fields_take_the_defaults() -> None:
    config = resolve_config(dict(UNSET), JobDefaults(), MODULES)
    assert config.to_dict() == {**asdict(JobDefaults()), "target_modules": list(JobDefaults().target_modules)}
    assert isinstance(config.target_modules, tuple)


def test_set_fields_are_kept_and_the_rest_defaulted() -> None:
    requested = {**UNSET, "lora_rank": 4, "learning_rate": 1e-4, "target_modules": ["q_proj", "v_proj"]}
    config = resolve_config(requested, JobDefaults(), MODULES)
    assert (config.lora_rank, config.learning_rate, config.target_modules) == (4, 1e-4, ("q_proj", "v_proj"))
    assert config.lora_alpha == JobDefaults().lora_alpha and config.seq_len == JobDefaults().seq_len
    assert JobConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_missing_keys_count_as_unset() -> None:
    assert resolve_config({}, JobDefaults(), MODULES) == resolve_config(dict(UNSET), JobDefaults(), MODULES)


@pytest.mark.parametrize(("key", "value", "bounds"), [
    ("lora_rank", 2048, "[1, 1024]"),
    ("lora_alpha", 1e5, "[0.001, 10000.0]"),
    ("lora_alpha", -1.0, "[0.001, 10000.0]"),
    ("lora_alpha", math.nan, "[0.001, 10000.0]"),
    ("seq_len", 4, "[8, 32768]"),
    ("learning_rate", 5.0, "[1e-07, 1.0]"),
    ("learning_rate", -1e-3, "[1e-07, 1.0]"),
    ("batch_size", 10_000, "[1, 4096]"),
    ("epochs", 101, "[1, 100]"),
    ("tokens_per_task", 10, "[64, 17179869184]"),
])
def test_out_of_range_values_are_refused_with_a_sentence(key: str, value: float, bounds: str) -> None:
    with pytest.raises(DatasetError) as info:
        resolve_config({**UNSET, key: value}, JobDefaults(), MODULES)
    assert str(info.value) == f"{key} = {value} is out of range; it must lie in {bounds}"


def test_unknown_target_modules_are_refused_naming_them_and_the_real_ones() -> None:
    with pytest.raises(DatasetError) as info:
        resolve_config({**UNSET, "target_modules": ["q_proj", "qkv", "c_attn"]}, JobDefaults(), MODULES)
    message = str(info.value)
    assert message.startswith("target modules c_attn, qkv are not linear layers of the base model")
    assert "q_proj" in message.split("it has:")[1] and "lm_head" in message


def test_default_targets_must_exist_in_the_model_too() -> None:
    with pytest.raises(DatasetError, match="gate_proj"):
        resolve_config({}, JobDefaults(), [m for m in MODULES if not m.endswith("gate_proj")])


# -- submit() -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(read_fortunes()[:300], vocab_size=400)


@pytest.fixture
def env(tmp_path, ledger):
    settings_ = Settings(data_dir=tmp_path, job=JobDefaults(tokens_per_task=200))
    return settings_, ledger, BlobStore(tmp_path / "blobs")


TEXTS = [f"record {i}: " + t for i, t in enumerate(read_fortunes()[300:400])]


def dataset(texts=TEXTS) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def stored(store: BlobStore) -> list:
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def run(env, tokenizer, data: bytes, filename: str = "d.jsonl", requested=None):
    settings_, ledger, store = env
    return submit(settings_, ledger, store, tokenizer, MODULES, data, filename, "test", requested or {})


def test_submit_records_a_job_whose_tasks_cover_the_training_records(env, tokenizer) -> None:
    _, ledger, store = env
    result = run(env, tokenizer, dataset())
    assert result.records == len(TEXTS) and result.validation_records == 5  # 5 % of 100
    job = ledger.jobs.get(result.job_id)
    assert job.state == "running" and job.name == "test"
    assert (job.n_records, job.n_validation) == (100, 5)
    assert job.total_tasks == result.tasks
    assert store.get(job.dataset) == dataset()
    records = read_records(store.get(job.records))
    assert sorted(records) == sorted(TEXTS) and records != TEXTS  # shuffled, nothing lost
    tasks = ledger.tasks.of_job(result.job_id)
    assert len(tasks) == result.tasks > 1
    assert [t.state for t in tasks] == ["pending"] * result.tasks
    assert ledger.leases.pending() == [t.task_id for t in tasks]
    bounds = [(t.start, t.end) for t in tasks]
    assert bounds[0][0] == 5 and bounds[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    counts = [len(ids) + 1 for ids in tokenizer(records[5:], add_special_tokens=False)["input_ids"]]
    assert result.tokens == sum(counts) == job.tokens
    assert [t.tokens for t in tasks] == [sum(counts[s - 5 : e - 5]) for s, e in bounds]
    assert job.config.tokens_per_task == 200


def test_validation_slice_is_deterministic_for_the_same_bytes(env, tokenizer) -> None:
    _, ledger, store = env
    first, second = run(env, tokenizer, dataset()), run(env, tokenizer, dataset())
    assert first.job_id != second.job_id
    a, b = ledger.jobs.get(first.job_id), ledger.jobs.get(second.job_id)
    assert a.records == b.records and a.n_validation == b.n_validation
    assert [(t.start, t.end) for t in ledger.tasks.of_job(first.job_id)] == \
           [(t.start, t.end) for t in ledger.tasks.of_job(second.job_id)]
    other = run(env, tokenizer, dataset(TEXTS[::-1]))  # same records, other bytes: another shuffle
    assert ledger.jobs.get(other.job_id).records != a.records


@pytest.mark.parametrize(("data", "filename", "requested", "match"), [
    pytest.param(dataset(TEXTS[:2]) + b'{"text": 1}\n' + dataset(TEXTS[2:]), "d.jsonl", {}, "^line 3: ",
                 id="bad-record"),
    pytest.param(dataset(), "d.csv", {}, r"\.jsonl or \.txt", id="csv"),
    pytest.param(b"", "d.jsonl", {}, "empty", id="empty"),
    pytest.param(dataset(TEXTS[:1]), "d.jsonl", {}, "at least 2 records", id="one-record"),
    pytest.param(dataset(), "d.jsonl", {"lora_rank": 5000}, "lora_rank", id="bad-config"),
    pytest.param(dataset(), "d.jsonl", {"target_modules": ["wq"]}, "wq", id="bad-target"),
])
def test_a_refused_submission_stores_nothing(env, tokenizer, data, filename, requested, match) -> None:
    _, ledger, store = env
    with pytest.raises(DatasetError, match=match):
        run(env, tokenizer, data, filename, requested)
    assert stored(store) == []
    assert ledger.jobs.ids() == [] and ledger.leases.pending() == []


def test_a_dataset_over_the_size_limit_is_refused(tmp_path, ledger, tokenizer) -> None:
    env = (Settings(data_dir=tmp_path, max_dataset_bytes=1000), ledger, BlobStore(tmp_path / "blobs"))
    with pytest.raises(DatasetError, match="at most 1000"):
        run(env, tokenizer, dataset())
    assert stored(env[2]) == [] and ledger.jobs.ids() == []


def test_epochs_multiply_task_tokens(env, tokenizer) -> None:
    _, ledger, _ = env
    once = run(env, tokenizer, dataset())
    twice = run(env, tokenizer, dataset(), requested={"epochs": 2})
    assert [2 * t.tokens for t in ledger.tasks.of_job(once.job_id)] == \
           [t.tokens for t in ledger.tasks.of_job(twice.job_id)]
    assert ledger.jobs.get(twice.job_id).tokens == 2 * ledger.jobs.get(once.job_id).tokens


def test_small_dataset_keeps_one_validation_record_and_one_task(env, tokenizer) -> None:
    _, ledger, _ = env
    result = run(env, tokenizer, dataset(TEXTS[:2]))
    assert (result.records, result.validation_records, result.tasks) == (2, 1, 1)
    (task,) = ledger.tasks.of_job(result.job_id)
    assert (task.start, task.end) == (1, 2)


@pytest.mark.parametrize("texts", [
    ["plain", "two\nlines", "tab\tand \"quotes\""],
    ["line\u2028separator", "para\u2029separator", "next\x85line", "form\x0cfeed", "cr\rhere", "x\x1cy"],
])
def test_records_blob_round_trips_every_text(texts: list[str]) -> None:
    blob = records_blob(texts)
    assert blob.count(b"\n") == len(texts)
    assert read_records(blob) == texts
    assert read_records(blob, 1, 2) == texts[1:2]


def test_empty_records_blob_reads_as_no_records() -> None:
    assert read_records(b"") == []


def test_task_tokens_count_what_the_trainer_packs(env, tokenizer) -> None:
    """Task sizes (and the cap on an upload's claimed tokens) must match nomoat.packing.pack."""
    from nomoat.packing import n_tokens, pack

    _, ledger, store = env
    texts = [f"{t} <|eos|> and <|pad|> are just text here" for t in TEXTS[:40]]
    result = run(env, tokenizer, dataset(texts), requested={"epochs": 3})
    records = read_records(store.get(ledger.jobs.get(result.job_id).records))
    for task in ledger.tasks.of_job(result.job_id):
        shard = records[task.start : task.end]
        assert task.tokens == 3 * n_tokens(pack(tokenizer, shard, 16))
