"""The wire contract: the committed gRPC modules are what the .proto files generate today, the
messages keep their encoding, and the generated package leaves the name ``proto`` alone."""

from pathlib import Path

from nomoat import codegen
from nomoat.v1 import nomoat_pb2 as pb
from nomoat.v1 import nomoat_pb2_grpc as pb_grpc


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    assert written, "protoc generated nothing"
    committed = codegen.ROOT
    for path in written:
        rel = path.relative_to(tmp_path)
        current = committed / rel
        assert current.exists(), f"{rel} is not committed; run `make proto`"
        assert current.read_bytes() == path.read_bytes(), f"{rel} is stale; run `make proto` and commit"


def test_a_message_keeps_its_wire_encoding_and_round_trips() -> None:
    # Field numbers and types are the contract with workers already deployed: these bytes are
    # encoded by hand from the .proto (tag = field number << 3 | wire type).
    chunk = pb.UploadChunk(manifest=pb.AdapterManifest(task_id="t", fence=7, base_version=2, rank=8, alpha=16.0))
    manifest = bytes.fromhex("0a0174" "1007" "1802" "2008" "2d00008041")  # 1: "t", 2: 7, 3: 2, 4: 8, 5: 16.0f
    assert chunk.SerializeToString() == bytes([0x0A, len(manifest)]) + manifest  # oneof part, field 1
    back = pb.UploadChunk.FromString(chunk.SerializeToString())
    assert back == chunk and back.WhichOneof("part") == "manifest" and back.manifest.fence == 7


def test_every_service_has_a_stub_and_a_servicer_for_each_method() -> None:
    for service in pb.DESCRIPTOR.services_by_name.values():
        servicer = getattr(pb_grpc, f"{service.name}Servicer")
        assert all(callable(getattr(servicer, m.name, None)) for m in service.methods), service.name
        assert callable(getattr(pb_grpc, f"{service.name}Stub")), service.name


def test_the_generated_code_leaves_the_name_proto_to_proto_plus() -> None:
    # Ray's dependencies install proto-plus, which owns the top-level name `proto`; the repo's
    # proto/ folder of .proto sources (on sys.path under pytest) must not shadow it.
    import proto

    assert hasattr(proto, "Message") and proto.__file__, proto
    assert codegen.PROTO_DIR not in Path(proto.__file__).resolve().parents, proto.__file__
    assert not list(codegen.PROTO_DIR.rglob("*_pb2*.py")), "generated code belongs in nomoat/v1, not proto/"
