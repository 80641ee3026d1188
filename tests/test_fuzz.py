"""Property-based fuzzing of every RPC over real gRPC: the coordinator never falls over.

For each RPC in the proto (found from its descriptor, so a new RPC is fuzzed without a change
here), hypothesis sends random bytes as the serialized request, random field values, random
orders of otherwise well-formed chunk streams, and random tokens. Properties, after every call:

* the answer is OK or a status code with a message; never UNKNOWN (an exception escaped a
  handler), never INTERNAL (except gRPC's own "Exception deserializing request!" for bytes that
  are not the message), never UNIMPLEMENTED;
* the ledger stays consistent (tests/consistency.py);
* afterwards the health check and a plain Status call still answer.

Bounded: 100-150 examples per RPC in the whole suite (``make test``, CI), a fifth of that in the
inner loop (``make test-fast`` loads the hypothesis profile "fast", tests/conftest.py);
derandomized so CI sees the same cases every run.
"""

from __future__ import annotations

import hashlib
import json
import string
import time

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomoat.v1 import nomoat_pb2 as pb
from tests import consistency
from tests.rig import SECRET, TEXTS, Rig, make_adapter, manifest, published, rig  # noqa: F401  (fixtures)

GRPC_DESERIALIZE = "Exception deserializing request!"
SERVICES = pb.DESCRIPTOR.services_by_name.values()
RPCS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
# Server-streaming RPCs that stream for as long as a job runs: read the first message, then hang up.
FIRST_ONLY = {"/nomoat.v1.Jobs/Watch"}
HEAVY = {"/nomoat.v1.Models/Pull", "/nomoat.v1.Datasets/Submit", "/nomoat.v1.Workers/Upload"}


def examples(full: int) -> int:
    """``full`` under hypothesis' default profile (100 examples: the whole suite); under another
    profile, the same share of ``full`` as its max_examples is of 100 ("fast": a fifth)."""
    return max(1, full * settings.default.max_examples // 100)


class World:
    """What exists in the ledger, so random values sometimes name real things."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.job_id = rig.submit().job_id
        self.task_ids = rig.ledger.tasks.ids(self.job_id)
        self.worker_ids = [rig.client("worker").register(f"w{i}", pb.Card(name="RTX", vram_gb=8)).worker_id
                           for i in range(2)]
        # Three leases held by the worker token, one done task with a buffered adapter.
        self.fences = {t: rig.lease(t) for t in self.task_ids[:4]}
        worker = rig.client("worker")
        for t in self.task_ids[:3]:
            assert worker.heartbeat(t, self.fences[t], self.worker_ids[0], secret=SECRET).ok
        self.adapter = make_adapter(rig.deps.shapes)
        done = self.task_ids[3]
        reply = worker.upload(manifest(done, self.fences[done], self.adapter), self.adapter)
        assert reply.accepted, reply.reason
        self.adapter_ids = [reply.adapter_id]
        self.tokens = [rig.tokens[r] for r in ("admin", "admin", "worker", "worker", "submitter", "reader")]
        self.tokens.append(rig.registry.create("worker", "another volunteer"))

    def strings(self) -> st.SearchStrategy[str]:
        known = [self.job_id, *self.task_ids, *self.worker_ids, *self.adapter_ids, SECRET, "d.jsonl", "d.txt", "../x",
                 "q_proj", hashlib.sha256(self.adapter).hexdigest()]
        return st.one_of(st.text(max_size=40), st.sampled_from(known))

    def numbers(self, lo: int, hi: int) -> st.SearchStrategy[int]:
        known = [n for n in (0, 1, 2, *self.fences.values(), len(self.adapter)) if lo <= n <= hi]
        return st.one_of(st.integers(lo, hi), st.sampled_from(known))


_RANGES = {
    d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


def values(world: World, field: d.FieldDescriptor, depth: int) -> st.SearchStrategy:
    t = field.type
    if t == d.FieldDescriptor.TYPE_STRING:
        one = world.strings()
    elif t == d.FieldDescriptor.TYPE_BYTES:
        one = st.binary(max_size=3000)
    elif t in _RANGES:
        one = world.numbers(*_RANGES[t])
    elif t == d.FieldDescriptor.TYPE_FLOAT:
        one = st.floats(width=32)
    elif t == d.FieldDescriptor.TYPE_DOUBLE:
        one = st.floats()
    elif t == d.FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif t == d.FieldDescriptor.TYPE_ENUM:
        one = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    elif t == d.FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        return st.dictionaries(values(world, key, depth + 1), values(world, value, depth + 1), max_size=3)
    elif t == d.FieldDescriptor.TYPE_MESSAGE:
        one = messages(world, field.message_type, depth + 1)
    else:
        raise NotImplementedError(f"no strategy for field type {t} ({field.full_name})")
    if field.is_repeated:
        return st.lists(one, max_size=3)
    return one


def messages(world: World, desc: d.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Random instances of ``desc``: any subset of its fields, at most one field of each oneof."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 2:
        return st.just(cls())
    plain = {f.name: values(world, f, depth) for f in desc.fields if f.containing_oneof is None}
    oneofs = [st.one_of(st.just({}), *[values(world, f, depth).map(lambda v, n=f.name: {n: v}) for f in o.fields])
              for o in desc.oneofs]
    return st.tuples(st.fixed_dictionaries({}, optional=plain), *oneofs).map(
        lambda parts: cls(**{k: v for part in parts for k, v in part.items()}))


def tokens(world: World) -> st.SearchStrategy[str]:
    printable = string.ascii_letters + string.digits + "-_.~+/= "
    real = st.sampled_from(world.tokens)
    return st.one_of(real, real, real, st.text(alphabet=printable, max_size=48))  # mostly real ones


# -- well-formed streams, then shuffled, cut and repeated ----------------------------------------


def submit_stream(world: World) -> st.SearchStrategy[list[pb.SubmitChunk]]:
    lines = st.one_of(st.sampled_from(TEXTS).map(lambda t: json.dumps({"text": t})),
                      st.text(max_size=200), st.just('{"text": 1}'), st.just('{"prompt": "a", "completion": "b"}'))

    @st.composite
    def build(draw) -> list[pb.SubmitChunk]:
        data = draw(st.one_of(st.lists(lines, max_size=40).map(lambda ls: "\n".join(ls).encode()),
                              st.binary(max_size=4000)))
        size = draw(st.one_of(st.just(len(data)), world.numbers(0, 2**64 - 1)))
        name = draw(st.sampled_from(["d.jsonl", "d.txt", "d.json", "d", "../../etc/passwd.jsonl"]))
        config = draw(messages(world, pb.JobConfig.DESCRIPTOR))
        cut = draw(st.integers(max(1, len(data) // 8), max(1, len(data))))  # at most 8 chunks: cheap to shuffle
        chunks = [pb.SubmitChunk(header=pb.SubmitHeader(name="fuzz", filename=name, size=size, config=config))]
        chunks += [pb.SubmitChunk(data=data[i : i + cut]) for i in range(0, len(data), cut)]
        good = hashlib.sha256(data).hexdigest()
        chunks.append(pb.SubmitChunk(sha256=draw(st.sampled_from([good, good, good[::-1], ""]))))
        return draw(shuffled(chunks))

    return build()


def upload_stream(world: World) -> st.SearchStrategy[list[pb.UploadChunk]]:
    @st.composite
    def build(draw) -> list[pb.UploadChunk]:
        data = bytearray(world.adapter)
        for _ in range(draw(st.integers(0, 3))):  # damage it: flip bytes, cut it, or make it up
            edit = draw(st.sampled_from(["flip", "cut", "random"]))
            if edit == "flip" and data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] ^= draw(st.integers(1, 255))
            elif edit == "cut":
                data = data[: draw(st.integers(0, len(data)))]
            else:
                data = bytearray(draw(st.binary(max_size=2000)))
        data = bytes(data)
        task = draw(st.sampled_from(world.task_ids[:5]) | world.strings())
        fence = draw(st.sampled_from([world.fences.get(task, 0), 0, 1, 2**64 - 1]))
        fields = draw(st.fixed_dictionaries({}, optional={
            "rank": world.numbers(0, 2**32 - 1), "alpha": st.floats(width=32), "base_version": world.numbers(0, 3),
            "tokens": world.numbers(0, 2**64 - 1), "size": world.numbers(0, 2**64 - 1),
            "offset": world.numbers(0, 2**64 - 1), "worker_id": world.strings(), "sha256": world.strings(),
        }))
        m = manifest(task, fence, data, **fields)
        cut = draw(st.integers(max(1, len(data) // 8), max(1, len(data))))
        chunks = [pb.UploadChunk(manifest=m)] + [pb.UploadChunk(data=data[i : i + cut])
                                                 for i in range(0, len(data), cut)]
        return draw(shuffled(chunks))

    return build()


def shuffled(chunks: list) -> st.SearchStrategy[list]:
    """The chunks as sent, or reordered, or some dropped and some repeated (``chunks`` is not empty)."""
    return st.one_of(st.just(chunks), st.just(chunks), st.permutations(chunks),
                     st.lists(st.sampled_from(chunks), max_size=len(chunks) + 2))


def requests(world: World, method: d.MethodDescriptor) -> st.SearchStrategy[list[bytes]]:
    """Serialized requests: raw bytes, random messages, and for client streams, mangled real ones."""
    ser = lambda ms: [m.SerializeToString() for m in ms]  # noqa: E731
    garbage = st.lists(st.binary(max_size=300), min_size=1, max_size=4)
    random_messages = messages(world, method.input_type)
    if not method.client_streaming:
        return st.one_of(garbage.map(lambda b: b[:1]), random_messages.map(lambda m: [m.SerializeToString()]))
    structured = {"SubmitChunk": submit_stream, "UploadChunk": upload_stream}[method.input_type.name](world)
    return st.one_of(garbage, st.lists(random_messages, max_size=5).map(ser), structured.map(ser),
                     structured.map(ser), structured.map(ser),
                     structured.map(ser).flatmap(lambda parts: garbage.map(lambda g: parts + g[:1])))


# -- the properties ------------------------------------------------------------------------------


def call(channel: grpc.Channel, path: str, method: d.MethodDescriptor, payload: list[bytes], token: str):
    streaming_in, streaming_out = method.client_streaming, method.server_streaming
    meta = (("authorization", f"Bearer {token}"),) if token else ()
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[(streaming_in, streaming_out)]
    request = iter(payload) if streaming_in else payload[0]
    try:
        reply = kind(path)(request, timeout=20, metadata=meta)
        if streaming_out:
            for i, _ in enumerate(reply):
                if path in FIRST_ONLY or i > 64:
                    reply.cancel()
                    break
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def check_answer(path: str, code: grpc.StatusCode, detail: str) -> None:
    if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED) and (code == grpc.StatusCode.OK or path in FIRST_ONLY):
        return
    assert detail, f"{path} answered {code.name} without a message"
    if code == grpc.StatusCode.INTERNAL:
        assert detail == GRPC_DESERIALIZE, f"{path} failed inside: {detail}"
        return
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.DEADLINE_EXCEEDED), f"{path} answered {code.name}: {detail}"


@pytest.fixture
def world(rig: Rig) -> World:
    return World(rig)


@pytest.mark.parametrize("path", sorted(RPCS))
def test_every_rpc_survives_random_and_malformed_requests(rig: Rig, world: World, path: str) -> None:
    method = RPCS[path]
    channel = grpc.insecure_channel(rig.address, options=[("grpc.max_receive_message_length", 16 << 20)])
    answers: dict[str, int] = {}

    @settings(max_examples=examples(100 if path in HEAVY else 150), deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(payload=requests(world, method), token=tokens(world))
    def fuzz(payload: list[bytes], token: str) -> None:
        code, detail = call(channel, path, method, payload, token)
        answers[code.name] = answers.get(code.name, 0) + 1
        check_answer(path, code, detail)
        consistency.check(rig.ledger)

    started = time.monotonic()
    try:
        fuzz()
    finally:
        channel.close()
    assert rig.healthy(), "the health check or Status stopped answering"
    consistency.check(rig.ledger)
    print(f"{path}: {answers} in {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -4.0, 0.0])
def test_a_manifest_that_lies_about_alpha_is_refused(rig: Rig, alpha: float) -> None:
    """Found by reading what the fuzzer could send: NaN compared false, so a NaN alpha passed."""
    task_id = rig.ledger.tasks.ids(rig.submit().job_id)[0]
    data = make_adapter(rig.deps.shapes)
    reply = rig.client("worker").upload(manifest(task_id, rig.lease(task_id), data, alpha=alpha), data)
    assert not reply.accepted and "the manifest says rank 2, alpha" in reply.reason, reply
    assert rig.ledger.tasks.get(task_id).state == "leased"


def _corrupt(world: World, case: str) -> str:
    """Break the ledger one way, as a bug would; returns what the check must say."""
    from coordinator.ledger import keys

    r, leased, done = world.rig.ledger.r, world.task_ids[0], world.task_ids[3]
    if case == "leased and pending":
        r.zadd(keys.PENDING, {leased: 1.0})
        return "both pending and leased"
    if case == "pending, not queued":
        r.zrem(keys.PENDING, world.task_ids[5])
        return "not in the pending queue"
    if case == "leased, no deadline":
        r.zrem(keys.LEASES, leased)
        return "not in the lease set"
    if case == "buffered twice":
        r.rpush(keys.FOLD_BUFFER, world.adapter_ids[0])
        return "in the fold buffer 2 times"
    if case == "buffered, no adapter":
        r.rpush(keys.FOLD_BUFFER, "nope")
        return "in the fold buffer but is None"
    if case == "done, no adapter":
        r.hset(keys.task(done), "adapter", "gone")
        return "has no record"
    r.hset(keys.task(leased), "state", "lost")
    return "unknown state 'lost'"


@pytest.mark.parametrize("case", ["leased and pending", "pending, not queued", "leased, no deadline", "buffered twice",
                                  "buffered, no adapter", "done, no adapter", "unknown state"])
def test_the_consistency_check_sees_a_broken_ledger(world: World, case: str) -> None:
    consistency.check(world.rig.ledger)
    message = _corrupt(world, case)
    with pytest.raises(AssertionError, match=message):
        consistency.check(world.rig.ledger)
