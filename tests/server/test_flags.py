"""Settings said once: edge-server's flags come from ServerSettings, and the choices from registries.

Covered: every ServerSettings field is exactly one flag (its name, or without ``_s`` for seconds),
whose help is the field's description with its default; a value given on each flag arrives in
the settings; a value under a field's lower bound is one usage line naming the flag; the
choices of the server's and the device's settings are the registries' own (backends, codecs,
pool policies, planner objectives, confidence rules).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import ValidationError

from edge.backends import BACKENDS, BackendName
from edge.cascade import RULES
from edge.daemon.config import AutoSplitConfig, CascadeConfig, EdgeConfig, EdgeServerConfig, RuntimeConfig
from edge.planner import OBJECTIVES
from edge.transport.failover import POLICIES
from edge.wire.encodings import CODECS, LOSSY, CodecName
from server.cli import build_parser, settings_from
from server.settings import ServerSettings


def _flags() -> dict[str, Any]:
    return {a.dest: a for a in build_parser()._actions if a.option_strings}


def test_every_setting_is_one_flag_with_its_description_and_default() -> None:
    flags = _flags()
    for name, field in ServerSettings.model_fields.items():
        action = flags[name]
        expected = "--" + (name[:-2] if name.endswith("_s") else name).replace("_", "-")
        assert action.option_strings == [expected], name
        assert (field.description or "").rstrip(".") in action.help, name
        if not field.is_required() and field.default_factory is None and field.default not in (None, False):
            shown = action.help.rsplit("(default: ", 1)[1].rstrip(")").replace(",", "")
            if isinstance(field.default, (int, float)):
                assert float(shown) == field.default, name
            else:
                assert shown == str(field.default), name
    assert set(flags) - set(ServerSettings.model_fields) == {"help", "version", "config", "check", "debug"}


VALUES = {
    "models": "/tmp/m", "host": "127.0.0.1", "port": "0", "backend": "tflite-runtime", "threads": "3",
    "workers": "0", "max_inflight": "7", "max_inflight_per_device": "5", "max_batch": "4",
    "max_batch_delay_us": "900", "max_stack": "5", "max_inflight_bytes": "4096", "cache_size": "3", "max_model_bytes": "5000",
    "max_message_bytes": "8192", "max_connections": "9", "idle_timeout_s": "1.5", "max_connection_age_s": "60",
    "grace_s": "0", "tls_cert": "/tmp/c.pem", "tls_key": "/tmp/k.pem", "tls_client_ca": "/tmp/ca.pem",
    "auth_tokens": "/tmp/t", "watch_s": "0.5", "model_control": None, "processes": "3", "metrics_port": "9100",
    "metrics_host": "127.0.0.1", "cpu_latency_us": "10",
}  # fmt: skip


def test_a_value_on_each_flag_arrives_in_the_settings() -> None:
    assert set(VALUES) == set(ServerSettings.model_fields), "a setting without a value here"
    parser = build_parser()
    argv: list[str] = []
    flags = _flags()
    for name, value in VALUES.items():
        argv += [flags[name].option_strings[0], *([] if value is None else [value])]
    settings = settings_from(parser.parse_args(argv), parser)
    for name, value in VALUES.items():
        got = getattr(settings, name)
        if value is None:
            assert got is True, name
        elif isinstance(got, Path):
            assert got == Path(value), name
        else:
            assert got == type(got)(value), name


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [("--threads", "0", "below the minimum, 1"), ("--max-batch-delay-us", "-1", "below the minimum, 0"),
     ("--grace", "-1", ">= 0"), ("--idle-timeout", "0", "above 0"), ("--port", "70000", "70000")],
)  # fmt: skip
def test_a_value_under_a_bound_is_one_usage_line(flag: str, value: str, says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "--models", "/tmp", flag, value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and says in lines[0], done.stderr


def _choices(model: Any, field: str) -> tuple[str, ...]:
    return tuple(get_args(model.model_fields[field].annotation))


def test_the_choices_are_the_registries() -> None:
    assert set(get_args(BackendName)) == set(BACKENDS)
    assert all(cls.key == name for name, cls in BACKENDS.items())
    assert _choices(ServerSettings, "backend") == _choices(RuntimeConfig, "backend") == get_args(BackendName)
    assert _flags()["backend"].choices == get_args(BackendName)
    assert set(get_args(CodecName)) == {"raw", *CODECS, *LOSSY}
    # A server's codec is one of the registry's names, or a calibrated codec's file.
    for name in (*get_args(CodecName), "codecs/digits.json"):
        assert EdgeServerConfig(address="h:1", codec=name).codec == name
    with pytest.raises(ValidationError, match="choose one of raw, zstd, lz4, fp16, int4, or the path"):
        EdgeServerConfig(address="h:1", codec="gzip")
    assert _choices(EdgeConfig, "policy") == POLICIES
    assert _choices(AutoSplitConfig, "objective") == OBJECTIVES
    assert _choices(CascadeConfig, "rule") == RULES
