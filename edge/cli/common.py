"""Arguments and set-up shared by the device-side subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from .. import models
from ..address import DEFAULT_PORT
from ..argtypes import address, positive_float, positive_int
from ..backends import BACKENDS, DEFAULT_BACKEND
from ..backends.support import require_runnable
from ..codec import CODEC_NAMES, CodecFile, add_max_loss_arg, codec_arg
from ..cooperative import CooperativeRunner
from ..cpu_latency import add_cpu_latency_arg
from ..credentials import TLSOptions, read_token
from ..errors import EdgeError, RemoteError, TensorFormatError
from ..fileio import load_arrays
from ..graph import ModelGraph
from ..policy import make_policy
from ..preprocess import coerce_input
from ..runner import ModelRunner
from ..transport import TailClient
from ..transport.connect import DEFAULT_CONNECT_TIMEOUT_S

__all__ = [
    "MODEL_HELP",
    "add_device_args",
    "add_server_args",
    "check_strict",
    "load_graph",
    "load_inputs",
    "open_runner",
]


MODEL_HELP = f"a .tflite file, or a shipped model's name ({', '.join(models.names()) or 'none shipped'})"


def add_device_args(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, help=MODEL_HELP)
    add_backend_args(p)
    add_cpu_latency_arg(p)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default=DEFAULT_BACKEND,
        help="device backend (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=positive_int, default=1, help="device interpreter threads (default: %(default)s)"
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    add_address_args(p)
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=2.0,
        help="deadline of each request, seconds (default: %(default)s)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 2 when a request fell back to the device (the server refused it or could not be "
        "reached), instead of finishing it here silently",
    )
    p.add_argument(
        "--transport",
        choices=["stream", "unary"],
        default="stream",
        help="stream: tail requests on one ModelStreamInfer stream (the device falls back to unary calls "
        "by itself if the server refuses); unary: one ModelInfer call each (default: %(default)s)",
    )
    p.add_argument(
        "--split-at",
        default=None,
        metavar="K|TENSOR|auto",
        help="the cut: an index 0..N, a tensor name (cut right after it), or auto; default: the middle cut",
    )
    p.add_argument(
        "--objective",
        choices=["latency", "energy", "bytes"],
        default="latency",
        help="what --split-at auto minimises (default: %(default)s)",
    )
    add_constraint_args(p, prefix="with auto: ")


def add_address_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        type=address,
        metavar="HOST[:PORT]",
        help=f"edge server address; the port defaults to {DEFAULT_PORT}",
    )
    p.add_argument("--model-name", help="the model's name on the server (default: the model file's stem)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="a bearer token (its first line) to send to the server",
    )
    p.add_argument(
        "--codec",
        type=codec_arg,
        default="raw",
        metavar="{" + ",".join(CODEC_NAMES) + "}|CODEC.json",
        help="compress the tensors sent when the server decodes the codec (it says so in its metadata; else "
        "they go raw): zstd or lz4 losslessly, accepting large outputs compressed too; or, lossy, fp16 "
        "(float cuts) or int4 (int8 cuts), or a codec calibrated on your data (edge codec calibrate), whose "
        "results are flagged (default: %(default)s)",
    )
    add_max_loss_arg(p)
    p.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=DEFAULT_CONNECT_TIMEOUT_S,
        metavar="S",
        help="deadline of connecting to the server (TCP, TLS, HTTP/2), apart from each request's: slow links "
        "take several round trips (default: %(default)s)",
    )
    p.add_argument("--tls-ca", type=Path, metavar="FILE", help="connect with TLS, trusting this CA (PEM)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="with --tls-ca: a client certificate (mTLS)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="the private key of --tls-cert")


def plotting() -> Any:
    """matplotlib's pyplot, drawing to files; EdgeError naming the extra when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise EdgeError("--plot needs matplotlib: pip install 'edge-coop[plot]'") from err
    return plt


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (EdgeError when it cannot be written) and close it."""
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as err:
        raise EdgeError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        plt.close(fig)


def add_constraint_args(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    p.add_argument(
        "--deadline-ms",
        type=positive_float,
        help=f"{prefix}only cuts predicted to finish within this many ms",
    )
    p.add_argument(
        "--max-bytes", type=positive_int, help=f"{prefix}only cuts that send at most this many bytes"
    )


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """A TailClient's options from the command line: ``tls`` (--tls-ca/--tls-cert/--tls-key), ``token``
    (--token-file), ``codec`` and ``connect_timeout_s``."""
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    tls = TLSOptions(ca_file=ca, cert_file=cert, key_file=key) if ca or cert or key else None
    token_file = getattr(args, "token_file", None)
    return {
        "tls": tls,
        "token": read_token(token_file) if token_file else None,
        "codec": getattr(args, "codec", "raw"),
        "connect_timeout_s": getattr(args, "connect_timeout", DEFAULT_CONNECT_TIMEOUT_S),
    }


def load_graph(spec: str) -> ModelGraph:
    return ModelGraph.from_file(models.resolve(spec))


def open_runner(args: argparse.Namespace, graph: ModelGraph, *, local: bool = False) -> CooperativeRunner:
    require_runnable(graph, args.backend)  # the fallback is the whole model: it must run here
    if isinstance(getattr(args, "codec", None), CodecFile):
        args.codec.check_model(graph)
    runner = ModelRunner(graph, backend=args.backend, threads=args.threads)
    client = (
        None
        if local or not getattr(args, "server", None)
        else TailClient(
            args.server, timeout_s=args.timeout, streaming=args.transport == "stream", **client_options(args)
        )
    )
    name = getattr(args, "model_name", None) or Path(graph.source).stem
    try:
        policy = make_policy(
            graph,
            args.split_at,
            runner=runner,
            client=client,
            model_name=name,
            objective=getattr(args, "objective", "latency"),
            deadline_ms=getattr(args, "deadline_ms", None),
            max_bytes=getattr(args, "max_bytes", None),
        )
    except BaseException:
        if client is not None:
            client.close()
        runner.close()
        raise
    return CooperativeRunner(runner, client, model_name=name, policy=policy, timeout_s=args.timeout)


def load_inputs(graph: ModelGraph, specs: list[str]) -> dict[str, np.ndarray]:
    """``--input file.npy`` for a one-input model, ``--input name=file.npy`` for each input otherwise."""
    wanted = {t.name: t for t in graph.inputs}
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep:
            if len(wanted) != 1:
                raise TensorFormatError(
                    f"the model has {len(wanted)} inputs; give each as --input NAME=FILE.npy ({', '.join(wanted)})"
                )
            name, path = next(iter(wanted)), spec
        if name not in wanted:
            raise TensorFormatError(f"the model has no input {name!r}; its inputs: {', '.join(wanted)}")
        named[name] = path
    missing = [n for n in wanted if n not in named]
    if missing:
        raise TensorFormatError(f"no --input given for {', '.join(missing)}")
    feeds = {}
    for name, path in named.items():
        arrays = load_arrays(path)
        if "" not in arrays:
            count = f"{len(arrays)} arrays" if arrays else "no array"
            raise TensorFormatError(f"{path}: holds {count}; give a .npy file with one")
        feeds[name] = coerce_input(arrays[""], wanted[name], integers_as_reals=False)
    return feeds


def check_strict(args: argparse.Namespace, fallbacks: int, total: int, reason: str | None) -> None:
    """With --strict, fallbacks are an error (one line, exit 2)."""
    if getattr(args, "strict", False) and fallbacks:
        raise RemoteError(f"{fallbacks} of {total} request(s) fell back to the device (--strict): {reason}")
