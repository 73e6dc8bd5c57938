"""Regenerate the checked-in protobuf code from the .proto files with grpcio-tools.

    python -m fedlora.protos.generate            # rewrite protos/fedlora/v1/*_pb2.py(i)
    python -m fedlora.protos.generate --out DIR  # write elsewhere (the test compares)

grpcio-tools is a test/dev dependency only: the generated files are checked in, so a
normal install needs just the protobuf runtime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES: tuple[str, ...] = ("fedlora/v1/adapter.proto",)


def generated_files() -> list[str]:
    """Paths, relative to the proto root, of the files protoc writes."""
    out = []
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    return out


def generate(out_dir: Path | None = None) -> list[Path]:
    """Run protoc (from grpcio-tools) into ``out_dir`` (default: next to the .proto files)."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise RuntimeError(
            "grpcio-tools is needed to regenerate the protobuf code: pip install grpcio-tools"
        ) from e
    out = Path(out_dir) if out_dir is not None else PROTO_ROOT
    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / f for f in generated_files()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
