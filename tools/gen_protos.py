"""Regenerate the committed Python code for the protos in ``protos/``.

Writes ``grpc_service_pb2.py``, ``grpc_service_pb2.pyi`` and ``grpc_service_pb2_grpc.py``
into ``edge/protocol`` (or ``--out DIR``). The output depends only on the .proto files and
the installed grpcio-tools, so ``tests/protocol/test_generated.py`` can regenerate into a
temporary directory and demand identical bytes.

Two edits are made to what protoc writes:

* ``_pb2_grpc.py`` imports its messages relatively, so the code works as ``edge.protocol``.
* ``_pb2.py`` registers its file in a private descriptor pool instead of the default one.
  tritonclient, MLServer and KServe each register the same ``inference.*`` symbols in the
  default pool, and a second registration fails at import time with "duplicate symbol
  'inference.ServerLiveRequest'" (SeldonIO/MLServer#1730, triton-inference-server/client#730).
  Our tests and users import tritonclient next to this package, so it must not collide.
  The wire format does not carry message names, so nothing else changes; a caller that
  needs the pool (gRPC reflection, for one) finds it at ``grpc_service_pb2.DESCRIPTOR.pool``.

Usage: python tools/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
DEFAULT_OUT = ROOT / "edge" / "protocol"
PROTOS = ("grpc_service.proto",)

_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# Post-processed by tools/gen_protos.py: a private pool, so that tritonclient, MLServer\n"
    "# or KServe registering the same inference.* symbols in the default pool cannot collide.\n"
    "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("
)


class GenerationError(RuntimeError):
    """protoc failed, or its output no longer looks like what this script edits."""


def _replace_once(text: str, old: str, new: str, path: Path) -> str:
    count = text.count(old)
    if count != 1:
        raise GenerationError(f"{path.name}: expected exactly one {old!r}, found {count}")
    return text.replace(old, new)


def _run_protoc(proto: str, out: Path) -> None:
    from grpc_tools import protoc  # only this tool needs grpcio-tools

    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        proto,  # relative to --proto_path, so the descriptor records no local path
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerationError(f"protoc failed on {PROTO_DIR / proto} with status {status}")


def _post_process(stem: str, out: Path) -> None:
    pb2 = out / f"{stem}_pb2.py"
    text = pb2.read_text(encoding="utf-8")
    pb2.write_text(_replace_once(text, _DEFAULT_POOL, _PRIVATE_POOL, pb2), encoding="utf-8", newline="\n")

    grpc_py = out / f"{stem}_pb2_grpc.py"
    text = grpc_py.read_text(encoding="utf-8")
    alias = stem.replace("_", "__") + "__pb2"
    text = _replace_once(
        text, f"import {stem}_pb2 as {alias}\n", f"from . import {stem}_pb2 as {alias}\n", grpc_py
    )
    grpc_py.write_text(text, encoding="utf-8", newline="\n")


def generate(out: Path) -> list[Path]:
    """Generate the code for every proto into ``out`` and return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for proto in PROTOS:
        stem = Path(proto).stem
        names = (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")
        # Generate beside the target first, so a failure leaves the committed files intact.
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            staging = Path(tmp)
            _run_protoc(proto, staging)
            _post_process(stem, staging)
            for name in names:
                (staging / name).replace(out / name)
                written.append(out / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the committed Python code for protos/.")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory to write the generated modules to (default: {DEFAULT_OUT.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = generate(args.out)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
