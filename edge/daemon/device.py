"""From a validated profile to the objects that run it: the model, its cut, the edge servers.

:func:`resolve` reads the model and checks the profile against it (labels, inputs, the cut)
without touching the network; ``edge run --check`` stops there. :func:`open_device` then
builds the cooperative runner.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import models
from ..backends import create_backend
from ..backends.support import require_runnable
from ..cascade import Calibration, Cascade, EarlyExit, Pressure, Router, Rule, check_pair, exit_cut
from ..codec import CodecFile
from ..cooperative import CooperativeRunner
from ..credentials import beside, read_token
from ..errors import ConfigError, EdgeError
from ..graph import ModelGraph
from ..policy import make_policy
from ..runner import ModelRunner
from ..transport import FailoverClient, TailClient, TailTransport
from .config import DeviceProfile, FixedSplitConfig

__all__ = ["CascadePlan", "ResolvedProfile", "open_cascade", "open_device", "preflight", "resolve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ResolvedProfile:
    """A profile resolved against its model."""

    profile: DeviceProfile
    source: Path
    """The profile file."""
    model_path: Path
    graph: ModelGraph
    model_name: str
    cut: int | None
    """The fixed cut, or None when the planner chooses."""
    cascade: CascadePlan | None = None
    codecs: tuple[str | CodecFile, ...] = ()
    """Each of ``edge.servers``' codec: its name, or its calibrated codec's file, loaded and checked."""


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """The profile's cascade, resolved: the small model, its rule and threshold."""

    small: ModelGraph | None
    """The small model run first, or None for an early exit of the profile's model."""
    rule: Rule
    threshold: float
    relaxed: float | None = None
    """The lowest threshold allowed while escalating goes badly (None: never relaxed)."""
    deadline_ms: float | None = None
    exit_output: str | None = None


def resolve(profile: DeviceProfile, source: Path) -> ResolvedProfile:
    """Resolve the model and check the profile against it; raises ConfigError naming file and key."""
    model_path = _resolve_model(profile.model.path, source)
    graph = ModelGraph.from_file(model_path)
    name = profile.model.name or model_path.stem
    _check_labels(profile, graph, source)
    _check_sensors(profile, graph, source)
    codecs = tuple(
        _codec(server.codec, server.max_loss, i, graph, source)
        for i, server in enumerate(profile.edge.servers)
    )
    cut = None
    if isinstance(profile.split, FixedSplitConfig):
        try:
            cut = graph.resolve_cut(profile.split.k)
        except EdgeError as err:
            raise ConfigError(f"{source}: split.k: {err}") from err
    return ResolvedProfile(
        profile=profile,
        source=source,
        model_path=model_path,
        graph=graph,
        model_name=name,
        cut=cut,
        cascade=_resolve_cascade(profile, graph, source),
        codecs=codecs,
    )


def _resolve_cascade(profile: DeviceProfile, graph: ModelGraph, source: Path) -> CascadePlan | None:
    config = profile.cascade
    if config is None:
        return None
    if config.calibration is not None:
        path = beside(config.calibration, source)
        try:
            calibration = Calibration.load(path)
            calibration.check_model(graph)
            small = calibration.small.load("small") if calibration.small is not None else None
        except EdgeError as err:
            raise ConfigError(f"{source}: cascade.calibration: {err}") from err
        relaxed = calibration.relaxed(config.max_extra_loss_pp)
        plan = CascadePlan(
            small,
            calibration.rule,
            calibration.threshold,
            relaxed,
            config.deadline_ms,
            calibration.exit_output,
        )
    else:
        assert config.threshold is not None  # the config's validator
        small = (
            ModelGraph.from_file(_resolve_model(config.small, source, key="cascade.small"))
            if config.small is not None
            else None
        )
        plan = CascadePlan(small, config.rule, config.threshold, None, config.deadline_ms, config.exit)
    try:
        if plan.small is not None:
            check_pair(plan.small, graph)
        else:
            assert plan.exit_output is not None  # the config's validator
            exit_cut(graph, plan.exit_output)
    except EdgeError as err:
        raise ConfigError(f"{source}: cascade: {err}") from err
    return plan


def open_cascade(resolved: ResolvedProfile, device: CooperativeRunner) -> Router | None:
    """The profile's cascade (or early exit) around ``device``, or None without one."""
    plan = resolved.cascade
    if plan is None:
        return None
    pressure = Pressure(plan.threshold, plan.relaxed, deadline_ms=plan.deadline_ms)
    if plan.exit_output is not None:
        return EarlyExit(device, plan.exit_output, rule=plan.rule, threshold=pressure)
    assert plan.small is not None
    runtime = resolved.profile.runtime
    small = ModelRunner(plan.small, backend=runtime.backend, threads=runtime.threads)
    return Cascade(small, device, rule=plan.rule, threshold=pressure)


def preflight(resolved: ResolvedProfile) -> None:
    """Every check start makes, short of connecting: the backend loads the model, and every TLS file,
    password file and certificate the profile names can be read. Raises ConfigError naming file and key."""
    profile, source = resolved.profile, resolved.source
    try:
        # The device's fallback is the whole model: a backend that cannot run it is refused here.
        require_runnable(
            resolved.graph,
            profile.runtime.backend,
            lambda: create_backend(
                profile.runtime.backend, resolved.graph.data, threads=profile.runtime.threads
            ).close(),
        )
    except EdgeError as err:
        raise ConfigError(f"{source}: runtime.backend: {err}") from err
    for i, server in enumerate(profile.edge.servers):
        if server.tls is not None:
            try:
                server.tls.options().beside(source).credentials()
            except ConfigError as err:
                raise ConfigError(f"{source}: edge.servers[{i}].tls: {err}") from err
        if server.token_file is not None:
            try:
                read_token(beside(server.token_file, source))
            except ConfigError as err:
                raise ConfigError(f"{source}: edge.servers[{i}].token_file: {err}") from err


def open_device(resolved: ResolvedProfile) -> CooperativeRunner:
    """The cooperative runner the profile describes (no request is sent yet)."""
    profile = resolved.profile
    runner = ModelRunner(resolved.graph, backend=profile.runtime.backend, threads=profile.runtime.threads)
    client = _client(resolved)
    split = profile.split
    try:
        if isinstance(split, FixedSplitConfig):
            assert resolved.cut is not None
            policy = make_policy(resolved.graph, resolved.cut)
            runner.warm(resolved.cut)
        else:
            # The planner measures the device once (cached under $EDGE_CACHE_DIR) and probes the servers.
            policy = make_policy(
                resolved.graph,
                "auto",
                runner=runner,
                client=client,
                model_name=resolved.model_name,
                objective=split.objective,
                deadline_ms=split.deadline_ms,
                max_bytes=split.max_bytes,
                progress=False,
            )
    except BaseException:
        if client is not None:
            client.close()
        runner.close()
        raise
    return CooperativeRunner(
        runner,
        client,
        model_name=resolved.model_name,
        policy=policy,
        timeout_s=profile.edge.timeout_s,
        retry_after_s=profile.edge.retry_after_s,
    )


def _codec(
    codec: str, max_loss: float | None, index: int, graph: ModelGraph, source: Path
) -> str | CodecFile:
    """A server's codec: its name, or a calibrated codec's file (beside the profile), checked against the
    model, its codecs chosen within ``max_loss`` when that is given."""
    if not codec.endswith(".json"):
        return codec
    try:
        loaded = CodecFile.load(beside(Path(codec), source))
        loaded.check_model(graph)
    except ConfigError as err:
        raise ConfigError(f"{source}: edge.servers[{index}].codec: {err}") from err
    return loaded if max_loss is None else loaded.within(max_loss)


def _client(resolved: ResolvedProfile) -> TailTransport | None:
    profile, source = resolved.profile, resolved.source
    edge = profile.edge
    clients: list[TailTransport] = []
    for i, server in enumerate(edge.servers):
        try:
            tls = server.tls.options().beside(source) if server.tls else None
            token = read_token(beside(server.token_file, source)) if server.token_file is not None else None
            clients.append(
                TailClient(
                    server.address,
                    timeout_s=edge.timeout_s,
                    connect_timeout_s=edge.connect_timeout_s,
                    tls=tls,
                    streaming=server.streaming,
                    token=token,
                    codec=resolved.codecs[i],
                    balance=server.balance,
                )
            )
        except ConfigError as err:
            key = "token_file" if "token file" in str(err) else "codec" if "codec" in str(err) else "tls"
            raise ConfigError(f"{source}: edge.servers[{i}].{key}: {err}") from err
    if not clients:
        return None
    if len(clients) == 1:
        return clients[0]
    return FailoverClient(clients, policy=edge.policy, retry_after_s=edge.retry_after_s)


def _resolve_model(spec: str, source: Path, key: str = "model.path") -> Path:
    relative = Path(spec).expanduser()
    if not relative.is_absolute() and (source.parent / relative).is_file():
        return source.parent / relative
    try:
        return models.resolve(relative)
    except EdgeError as err:
        raise ConfigError(f"{source}: {key}: {err}") from err


def _check_labels(profile: DeviceProfile, graph: ModelGraph, source: Path) -> None:
    labels = profile.model.labels
    if labels is None:
        return
    sizes = {math.prod(t.shape) for t in graph.outputs}
    if len(sizes) != 1:
        raise ConfigError(
            f"{source}: model.labels: the model has {len(graph.outputs)} outputs of different sizes; labels need "
            "one classifier output (or several of one size, as a model with early exits has)"
        )
    classes = sizes.pop()
    if len(labels) != classes:
        raise ConfigError(f"{source}: model.labels: {len(labels)} labels for {classes} output classes")


def _check_sensors(profile: DeviceProfile, graph: ModelGraph, source: Path) -> None:
    names = [t.name for t in graph.inputs]
    for i, sensor in enumerate(profile.sensors):
        key = f"{source}: sensors[{i}]"
        if sensor.input is not None and sensor.input not in names:
            raise ConfigError(
                f"{key}.input: the model has no input {sensor.input!r} (inputs: {', '.join(names)})"
            )
        if sensor.format != "json" and sensor.input is None and len(names) != 1:
            raise ConfigError(
                f"{key}.input: the model has {len(names)} inputs; name the one this sensor feeds"
            )
        tensor = next(t for t in graph.inputs if t.name == (sensor.input or names[0]))
        if sensor.shape is not None and math.prod(sensor.shape) != math.prod(tensor.shape):
            raise ConfigError(
                f"{key}.shape: {sensor.shape} has {math.prod(sensor.shape)} elements; input {tensor.name!r} "
                f"{list(tensor.shape)} has {math.prod(tensor.shape)}"
            )
        if sensor.format == "image" and not (
            len(tensor.shape) in (3, 4)
            and tensor.shape[0] == 1
            and (len(tensor.shape) == 3 or tensor.shape[3] in (1, 3))
        ):
            raise ConfigError(
                f"{key}.format: input {tensor.name!r} {list(tensor.shape)} is not an image input"
            )
        if (
            sensor.dtype is not None
            and np.dtype(sensor.dtype).kind == "f"
            and tensor.quantization is None
            and (np.issubdtype(tensor.dtype, np.integer))
        ):
            raise ConfigError(f"{key}.dtype: input {tensor.name!r} has no quantization to turn reals into")
