"""Hatch build hook: generate the protobuf and gRPC modules from protos/ at install/build time.

Generated code is never committed or hand-edited; every `pip install` (editable or wheel) regenerates it,
so it always matches the pinned grpcio-tools/protobuf.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def generate_protos(root: Path) -> list[Path]:
    """Compile every .proto under protos/ into *_pb2.py, *_pb2.pyi and *_pb2_grpc.py beside it."""
    import grpc_tools
    from grpc_tools import protoc

    proto_root = root / "protos"
    sources = sorted(proto_root.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for source in sources:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={proto_root}",
            f"--pyi_out={proto_root}",
            f"--grpc_python_out={proto_root}",
            str(source),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")
    return sources


class ProtoBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        generate_protos(Path(self.root))


if __name__ == "__main__":
    for path in generate_protos(Path(__file__).parent):
        print(f"generated code for {path}")
