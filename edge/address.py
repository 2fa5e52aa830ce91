"""Edge server addresses: ``HOST:PORT``, ``[IPV6]:PORT``, a bare host on the default port, or a gRPC
target naming several (``dns:///NAME:PORT``, ``ipv4:A:P,B:P``)."""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "check_host",
    "check_port",
    "format_address",
    "is_target",
    "normalize",
    "parse_address",
]

DEFAULT_PORT = 8001
"""edge-server's port when none is given."""

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$"
)
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")


def check_port(value: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"port {value} is out of range {low}..65535")
    return value


def check_host(host: str) -> str:
    """A host name, an IPv4 address or an IPv6 address (without brackets)."""
    if ":" in host:
        if not _IPV6.match(host):
            raise ConfigError(f"{_show(host)} is not an IPv6 address")
        return host
    if not _HOSTNAME.match(host):
        raise ConfigError(f"{_show(host)} is not a host name or address")
    return host


def parse_address(text: str, *, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """(host, port) of ``text``; raises ConfigError naming the problem."""
    text = text.strip()
    if not text:
        raise ConfigError("the address is empty; give HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"{_show(text)}: an IPv6 address needs its closing ']'")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{_show(text)}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
        if ":" not in host:
            raise ConfigError(f"{_show(text)}: only IPv6 addresses go in brackets")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        elif ":" in host:
            raise ConfigError(f"{_show(text)}: write an IPv6 address in brackets, as [ADDRESS]:PORT")
        if sep and not port_text:
            raise ConfigError(f"{_show(text)}: the port is missing after ':'")
    check_host(host)
    if not port_text:
        return host, default_port
    if not port_text.isdigit():
        raise ConfigError(f"{_show(text)}: the port {_show(port_text)} is not a number")
    try:
        return host, check_port(int(port_text))
    except ConfigError as err:
        raise ConfigError(f"{_show(text)}: {err}") from err


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_SCHEMES = ("dns:", "ipv4:", "ipv6:")
"""gRPC target schemes taken as they are: ``dns:///NAME:PORT`` (every record of NAME), and
``ipv4:A:P,B:P`` / ``ipv6:[A]:P,[B]:P`` (several addresses, for gRPC's round_robin balancing)."""

MAX_TARGET_CHARS = 1024


def is_target(text: str) -> bool:
    """``text`` is a gRPC target with a scheme (several records or addresses), not HOST:PORT."""
    return text.strip().startswith(_SCHEMES)


def normalize(text: str, *, default_port: int = DEFAULT_PORT) -> str:
    """``text`` checked and written out in full, as gRPC takes it. A gRPC target (``dns:``,
    ``ipv4:``, ``ipv6:``) keeps its form, each of its addresses checked."""
    text = text.strip()
    if is_target(text):
        return _target(text, default_port)
    return format_address(*parse_address(text, default_port=default_port))


def _target(text: str, default_port: int) -> str:
    if len(text) > MAX_TARGET_CHARS:
        raise ConfigError(f"{_show(text)}: a target is at most {MAX_TARGET_CHARS} characters")
    scheme, _, rest = text.partition(":")
    if scheme == "dns":
        authority, name = "", rest
        if rest.startswith("//"):  # dns://[DNS-SERVER]/NAME[:PORT]
            authority, _, name = rest[2:].partition("/")
        return f"dns://{authority}/{normalize(name, default_port=default_port)}"
    parts = [p for p in rest.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{_show(text)}: list one address or more after '{scheme}:'")
    return f"{scheme}:" + ",".join(normalize(p, default_port=default_port) for p in parts)


def _show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")
