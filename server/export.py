"""Deployment files for serving a model's tails on MLServer (and KServe) with :mod:`server.mlserver`.

:func:`write_mlserver` writes a directory ready for ``mlserver start DIR``::

    DIR/settings.json                      the server: ports, workers, and the extensions a device reads
    DIR/NAME/model-settings.json           the whole model (pings, profiles, any cut)
    DIR/NAME/NAME.tflite
    DIR/NAME@K/model-settings.json         the tail of cut K under its own name, batched by MLServer
    DIR/requirements.txt                   what the runtime needs (for ``mlserver build``)

The server settings list ``split_point``, ``model_sha256``, ``edge_packed_tensors`` and one
``edge_cut_model:NAME@K`` per cut: a device then packs its tensors, and sends the tails of cut K
to ``NAME@K``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import edge
from edge import wire
from edge.errors import ConfigError
from edge.graph import ModelGraph
from edge.wire import packed

__all__ = ["RUNTIME", "write_mlserver"]

RUNTIME = "server.mlserver.EdgeRuntime"
"""The import path MLServer loads the runtime by."""

# Inside the edge package: edge/firmware_config is the top-level firmware_config/ in a checkout (a link)
# and a directory of its own in the wheel.
_REQUIREMENTS = Path(edge.__file__).parent / "firmware_config" / "server" / "mlserver" / "requirements.txt"


def write_mlserver(
    graph: ModelGraph,
    out: Path,
    *,
    cuts: Sequence[int] = (),
    name: str | None = None,
    parallel_workers: int = 0,
    max_batch_size: int = 1,
    max_batch_time_ms: float = 1.0,
    backend: str = "litert",
    threads: int = 1,
    grpc_port: int = 8081,
    http_port: int = 8080,
    metrics_port: int = 8082,
) -> list[Path]:
    """Write the MLServer directory for ``graph`` (and ``cuts``) into ``out``; the files written."""
    name = name or Path(graph.source).stem
    n = graph.num_operators
    bad = [k for k in cuts if not 0 <= k < n]
    if bad:
        raise ConfigError(f"cuts must be 0..{n - 1} for {name} (a cut of {n} sends nothing); got {bad}")
    if "@" in name or "/" in name:
        raise ConfigError(f"model name {name!r}: '@' and '/' are not allowed")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    try:
        requirements_text = _REQUIREMENTS.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"the MLServer requirements file is missing from this install: {_REQUIREMENTS}"
        ) from err
    # A directory may hold several models, exported one after another: their extensions add up.
    settings_file = out / "settings.json"
    listed: list[str] = []
    if settings_file.exists():
        try:
            listed = [str(e) for e in json.loads(settings_file.read_text()).get("extensions", [])]
        except (OSError, ValueError, AttributeError) as err:
            raise ConfigError(f"{settings_file} is not an MLServer settings file: {err}") from err
    # Everything is checked before anything is written: a refused export leaves nothing behind.
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def dump(path: Path, document: dict[str, object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
        written.append(path)

    extra = {"backend": backend, "threads": threads}
    model_file = out / name / f"{name}.tflite"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(graph.source, model_file)
    written.append(model_file)
    dump(
        out / name / "model-settings.json",
        {
            "name": name,
            "implementation": RUNTIME,
            "parameters": {"uri": f"./{model_file.name}", "extra": extra},
        },
    )
    for k in sorted(set(cuts)):
        dump(
            out / f"{name}@{k}" / "model-settings.json",
            {
                "name": f"{name}@{k}",
                "implementation": RUNTIME,
                "max_batch_size": max_batch_size,
                "max_batch_time": max_batch_time_ms / 1000.0,
                "parameters": {
                    "uri": f"../{name}/{model_file.name}",
                    "extra": {**extra, wire.SPLIT_POINT: k},
                },
            },
        )
    wanted = [
        *wire.EXTENSIONS,
        packed.EXTENSION,
        *(f"{wire.CUT_MODEL_PREFIX}{name}@{k}" for k in sorted(set(cuts))),
    ]
    dump(
        settings_file,
        {
            "debug": False,
            "parallel_workers": parallel_workers,
            "grpc_port": grpc_port,
            "http_port": http_port,
            "metrics_port": metrics_port,
            "grpc_max_message_length": 64 * 1024 * 1024,
            "extensions": list(dict.fromkeys([*listed, *wanted])),
        },
    )
    requirements = out / "requirements.txt"
    requirements.write_bytes(requirements_text)
    written.append(requirements)
    return written
