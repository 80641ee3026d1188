"""Regenerate the gRPC modules in ``nomoat/v1`` from ``proto/nomoat/v1/*.proto``.

Run ``python -m nomoat.codegen`` after editing a ``.proto`` file and commit the result;
``tests/test_proto.py`` fails while the committed modules are stale. Needs ``grpcio-tools``
(the ``dev`` and ``test`` extras).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every .proto under proto/ into ``out_dir``."""
    from grpc_tools import protoc  # only needed by developers, not at run time

    sources = sorted(PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s.relative_to(PROTO_DIR)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its message above")
    return sorted((out_dir / "nomoat").rglob("*_pb2*.py*"))


def main() -> None:
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    sys.exit(main())
