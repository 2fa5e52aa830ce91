"""Check TLS files before they are used: the kinds, the pair, the expiry. One line naming the file.

gRPC takes PEM bytes as they are and fails only at the first handshake, or at start with a
message about the port. These checks use the standard library's ``ssl`` module, on the device
and on the server alike.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from .errors import ConfigError

__all__ = ["check_ca", "check_pair"]


def _kind(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from err
    if "PRIVATE KEY-----" in text:
        return "key"
    if "BEGIN CERTIFICATE-----" in text:
        return "certificate"
    return "unknown"


def check_pair(cert: Path, key: Path, *, what: str = "TLS") -> None:
    """``cert`` is a certificate that has not expired, ``key`` its private key."""
    if _kind(cert) != "certificate":
        raise ConfigError(f"{what} certificate {cert} holds no PEM certificate" + _hint(cert))
    if _kind(key) != "key":
        raise ConfigError(f"{what} key {key} holds no PEM private key" + _hint(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
            raise ConfigError(f"{what} key {key} does not match the certificate {cert}") from err
        raise ConfigError(
            f"{what} certificate {cert} and key {key} cannot be used: {err.reason or err}"
        ) from err
    _check_dates(cert, what)


def check_ca(ca: Path, *, what: str = "CA") -> None:
    """``ca`` holds at least one certificate (not a key)."""
    if _kind(ca) != "certificate":
        raise ConfigError(f"{what} file {ca} holds no PEM certificate" + _hint(ca))
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as err:
        raise ConfigError(f"{what} file {ca} cannot be read as certificates: {err.reason or err}") from err


def _hint(path: Path) -> str:
    return " (it is a private key)" if _kind(path) == "key" else ""


def _check_dates(cert: Path, what: str) -> None:
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return  # an interpreter without it: the handshake will tell
    try:
        info = decode(str(cert))
    except (ssl.SSLError, OSError, ValueError):
        return
    now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    after, before = info.get("notAfter"), info.get("notBefore")
    if after and ssl.cert_time_to_seconds(after) < now:
        raise ConfigError(f"{what} certificate {cert} expired on {after}")
    if before and ssl.cert_time_to_seconds(before) > now:
        raise ConfigError(f"{what} certificate {cert} is not valid until {before}")
