"""Credentials, said once for the device and the server: TLS files, bearer tokens and secret files.

- Secret files (keys, certificates, tokens, passwords) are read by :func:`read_secret`: one line
  naming the file when it cannot be read.
- A TLS certificate and its key come together or not at all (:func:`check_tls_files`), and are
  checked with the standard library's ``ssl`` before gRPC sees them: the kinds, the pair, the
  expiry. gRPC takes PEM bytes as they are and fails only at the first handshake.
- A bearer token has :data:`MIN_TOKEN_CHARS` to :data:`MAX_TOKEN_CHARS` characters and no space, on
  both sides. The device sends it as call metadata (:func:`bearer_metadata`); the server
  reads it with :func:`bearer_token`.
- Relative paths in a profile resolve against the profile's folder (:func:`beside`), as model and
  calibration paths do.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

import grpc

from .errors import ConfigError

__all__ = [
    "AUTHORIZATION",
    "MAX_TOKEN_CHARS",
    "MIN_TOKEN_CHARS",
    "TLSOptions",
    "bearer_metadata",
    "bearer_token",
    "beside",
    "check_ca",
    "check_pair",
    "check_tls_files",
    "check_token",
    "read_first_line",
    "read_secret",
    "read_token",
]

AUTHORIZATION = "authorization"
_BEARER = "Bearer "
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512


# -- files -------------------------------------------------------------------------------------


def read_secret(path: Path, what: str = "") -> bytes:
    """The bytes of ``path``; ConfigError naming ``what`` and the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what + ' ' if what else ''}{path}: {err.strerror or err}") from err


def read_first_line(path: Path, what: str = "") -> str:
    """The first line of a UTF-8 file, unstripped ("" for an empty file)."""
    try:
        text = read_secret(path, what).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read {what + ' ' if what else ''}{path}: it is not UTF-8 text") from err
    lines = text.splitlines()
    return lines[0] if lines else ""


@overload
def beside(path: Path, source: Path) -> Path: ...
@overload
def beside(path: None, source: Path) -> None: ...
def beside(path: Path | None, source: Path) -> Path | None:
    """``path`` as written in the file ``source``: relative paths resolve against its folder."""
    if path is None:
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else source.parent / path


# -- tokens ------------------------------------------------------------------------------------


def check_token(token: str) -> str | None:
    """What is wrong with ``token`` as a bearer token; None when nothing is."""
    if any(c.isspace() for c in token):
        return "a token holds no spaces"
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        return f"a token has {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters"
    return None


def read_token(path: Path) -> str:
    """A bearer token from the first line of ``path``; ConfigError naming the file otherwise."""
    token = read_first_line(path, "the token file").strip()
    if not token:
        raise ConfigError(f"the token file {path} must hold the token on its first line")
    problem = check_token(token)
    if problem is not None:
        raise ConfigError(f"the token file {path}: {problem} (edge-server takes no other)")
    return token


def bearer_token(metadata: Any) -> str:
    """The token of an ``authorization: Bearer TOKEN`` entry; "" without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value.startswith(_BEARER):
            return value[len(_BEARER) :].strip()
    return ""


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token``; a device's session puts it on every call.

    Not a client interceptor: grpc.aio's intercepted streams pass every write through a queue of
    their own (a hop per message on the request path) and log a CancelledError when closed."""
    return ((AUTHORIZATION, _BEARER + token),)


# -- TLS ---------------------------------------------------------------------------------------


def check_tls_files(
    *, cert: Path | None, key: Path | None, ca: Path | None, what: str, ca_what: str = "CA"
) -> None:
    """The one rule for a certificate and its key (both or neither), then each file checked:
    ConfigError naming the file."""
    if (cert is None) != (key is None):
        raise ConfigError(f"{what} needs both a certificate and its key, or neither")
    if ca is not None:
        check_ca(Path(ca), what=ca_what)
    if cert is not None and key is not None:
        check_pair(Path(cert), Path(key), what=what)


def _kind(path: Path) -> str:
    text = read_secret(path).decode(errors="replace")
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


@dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS for a device's channel: a CA to trust, and a client certificate for mTLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def beside(self, source: Path) -> TLSOptions:
        """These options as written in the file ``source``: relative paths resolve against its folder."""
        return replace(
            self,
            ca_file=beside(self.ca_file, source),
            cert_file=beside(self.cert_file, source),
            key_file=beside(self.key_file, source),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return None if path is None else read_secret(path, "TLS file")

        roots, key, chain = read(self.ca_file), read(self.key_file), read(self.cert_file)
        check_tls_files(
            cert=self.cert_file, key=self.key_file, ca=self.ca_file, what="client TLS", ca_what="TLS CA"
        )
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
