"""Find a device profile by path or name, read its TOML, and validate it.

Every error names the file, the key (as a dotted path such as ``sensors[0].format``) and
the problem, on one line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..address import parse_address
from ..errors import ConfigError
from .config import DeviceProfile, EdgeServerConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["SEARCH_PATH", "apply_overrides", "available", "find", "load", "parse"]

logger = logging.getLogger(__name__)

# Local profiles in /etc/edge win over the shipped ones (firmware_config/, packaged as edge/firmware_config).
SEARCH_PATH: tuple[Path, ...] = (
    Path("/etc/edge"),
    (Path(__file__).resolve().parents[1] / "firmware_config").resolve(),
)

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def available(search: Sequence[Path] = SEARCH_PATH) -> list[str]:
    """Profile names found on the search path."""
    found: set[str] = set()
    for folder in search:
        if folder.is_dir():
            found.update(p.stem for p in folder.glob("*.toml"))
    return sorted(found)


def find(spec: str | Path, search: Sequence[Path] = SEARCH_PATH) -> Path:
    """``spec`` as a file, or the profile of that name (``NAME`` or ``NAME.toml``) on the search path."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.name == str(spec):
        name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
        for folder in search:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    where = ", ".join(str(p) for p in search)
    raise ConfigError(
        f"{spec}: no such profile file, and no profile by that name in {where} "
        f"(available: {', '.join(available(search)) or 'none'})"
    )


def load(path: Path) -> DeviceProfile:
    """Read and validate the profile at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {getattr(err, 'strerror', None) or err}") from err
    return parse(text, source=str(path))


def parse(text: str, *, source: str = "<profile>") -> DeviceProfile:
    """Validate a profile given as TOML text; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _TOML_POSITION.search(message)
        if match:
            message = _TOML_POSITION.sub("", message)
            raise ConfigError(f"{source}:{match.group(1)}: invalid TOML: {message}") from err
        raise ConfigError(f"{source}: invalid TOML: {message}") from err
    return validate(data, source=source)


def validate(data: dict[str, Any], *, source: str) -> DeviceProfile:
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe(err, data, source)) from err


def apply_overrides(
    profile: DeviceProfile,
    *,
    broker: str | None = None,
    servers: Sequence[str] = (),
    source: str = "<profile>",
) -> DeviceProfile:
    """The profile with its broker address and edge servers replaced (TLS and credentials are kept)."""
    data = profile.model_dump(mode="python", exclude_none=True)
    if broker is not None:
        try:
            data["mqtt"]["host"], data["mqtt"]["port"] = parse_address(broker, default_port=1883)
        except ConfigError as err:
            raise ConfigError(f"--broker {broker}: {err}") from err
    if servers:
        # The i-th address replaces the i-th server and keeps its TLS, token and transport; one
        # beyond the profile's list is set up like its first server.
        kept = profile.edge.servers
        replaced = []
        for i, address in enumerate(servers):
            like = kept[i] if i < len(kept) else (kept[0] if kept else None)
            settings = like.model_dump(exclude={"address"}, exclude_none=True) if like is not None else {}
            try:
                replaced.append(EdgeServerConfig(address=address, **settings))
            except ValidationError as err:
                raise ConfigError(f"--server {address}: {err.errors()[0]['msg']}") from err
        data["edge"]["servers"] = replaced
    return validate(data, source=f"{source} (with command-line overrides)")


def describe(err: ValidationError, data: Any, source: str) -> str:
    """One line: ``file: key: problem`` for each problem, joined with '; '."""
    parts = []
    for problem in err.errors():
        key = _dotted(problem["loc"], data)
        # Checks across keys (model validators) name their keys in the message.
        parts.append(f"{source}: {key}: {_message(problem)}" if key else f"{source}: {_message(problem)}")
    return "; ".join(parts)


def _dotted(loc: tuple[int | str, ...], data: Any) -> str:
    """The key path as written in the file.

    pydantic puts the chosen variant of a discriminated union (``fixed``, ``auto``) into the
    location; those parts are not keys of the document, so they are dropped.
    """
    text = ""
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            text += f"[{part}]"
            node = node[part]
        elif isinstance(node, dict) and part in node:
            text += f".{part}" if text else str(part)
            node = node[part]
        elif last or not isinstance(part, str):
            text += f".{part}" if text else str(part)
            node = None
    return text


def _message(problem: Any) -> str:
    kind = problem["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(problem["msg"])
    message = message.removeprefix("Value error, ")
    if kind in {"union_tag_invalid", "union_tag_not_found"}:
        return f"{message} (choose type = 'fixed' with k, or type = 'auto' with an objective)"
    if "input" in problem and not isinstance(problem["input"], (dict, list)) and kind != "value_error":
        return f"{message}, got {problem['input']!r}"
    return message
