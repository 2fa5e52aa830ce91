"""``edge run``: the device daemon that answers sensor messages from MQTT with cooperative inference.

Data path: :mod:`.profiles` reads a TOML profile and :mod:`.config` validates it;
:mod:`.device` resolves the model and builds the runner; :mod:`.service` reads MQTT,
decodes payloads (:mod:`.payloads`), runs the model, publishes :mod:`.messages`, and
acknowledges each message once its result is confirmed (:mod:`.ledger`).
"""

from __future__ import annotations

from .config import DeviceProfile
from .device import ResolvedProfile, open_cascade, open_device, preflight, resolve
from .profiles import apply_overrides, available, find, load
from .service import Daemon

__all__ = [
    "Daemon",
    "DeviceProfile",
    "ResolvedProfile",
    "apply_overrides",
    "available",
    "find",
    "load",
    "open_cascade",
    "open_device",
    "preflight",
    "resolve",
]
