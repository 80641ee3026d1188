"""The committed gRPC modules must be what the .proto files generate today."""

from pathlib import Path

from nomoat import codegen


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = codegen.generate(tmp_path)
    assert written, "protoc generated nothing"
    committed = codegen.ROOT
    for path in written:
        rel = path.relative_to(tmp_path)
        current = committed / rel
        assert current.exists(), f"{rel} is not committed; run `make proto`"
        assert current.read_bytes() == path.read_bytes(), f"{rel} is stale; run `make proto` and commit"


def test_generated_package_is_not_named_proto() -> None:
    # Ray's dependencies install proto-plus, which owns the top-level name `proto`.
    import nomoat.v1.nomoat_pb2 as pb

    assert pb.__name__ == "nomoat.v1.nomoat_pb2"
    assert pb.DESCRIPTOR.package == "nomoat.v1"
