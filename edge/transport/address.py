"""Edge server addresses: ``HOST:PORT``, ``[IPV6]:PORT``, or a bare host on the default port."""

from __future__ import annotations

import re

from ..errors import ConfigError

__all__ = ["DEFAULT_PORT", "check_host", "check_port", "format_address", "normalize", "parse_address"]

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


def normalize(text: str, *, default_port: int = DEFAULT_PORT) -> str:
    """``text`` checked and written out in full, as gRPC takes it."""
    return format_address(*parse_address(text, default_port=default_port))


def _show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")
