#!/usr/bin/env bash
# Install what the tests need and run them all: the suite on LiteRT (MLServer's runtime tests start
# `mlserver` from a venv of its own), then the split equivalence tests and the tflite-runtime
# device profile in a venv of its own (it needs numpy < 2).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (the MQTT broker the daemon tests run against)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
# Debian starts a system broker on 1883 after install; the tests start their own on free ports.

echo "== installing edge-coop with the test extras"
"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[dev,daemon]'

echo "== MLServer 1.7.1 in a venv of its own (it wants protobuf < 7), for tests/mlserver"
ML_VENV=.venv-mlserver
[ -x "$ML_VENV/bin/python" ] || "$PYTHON" -m venv "$ML_VENV"
"$ML_VENV/bin/python" -m pip install -q --disable-pip-version-check -r firmware_config/server/mlserver/requirements.txt
"$ML_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .

echo "== lint and types"
"$PYTHON" -m ruff check edge server tests tools bench
"$PYTHON" -m ruff format --check edge server tests tools bench
"$PYTHON" -m mypy edge server

echo "== test suite (backend: litert)"
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"

echo "== on tflite-runtime (numpy < 2, own venv): split equivalence, and the profiles that name it"
VENV=.venv-tflite-runtime
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,tflite-runtime,daemon]'
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/edge/test_equivalence.py tests/edge/test_zoo.py \
    tests/daemon/test_shipped_profiles.py --backends tflite-runtime

# Devices are aarch64: the split equivalence tests again in a Debian arm64 root under qemu-user, on
# both backends, and an aarch64 device against this machine's server. It needs root (binfmt_misc,
# chroot); CI runs as root.
if [ "$(id -u)" = 0 ]; then
    echo "== aarch64 under qemu-user (tests/aarch64/run.sh)"
    bash tests/aarch64/run.sh
else
    echo "== aarch64: not run (it needs root for binfmt_misc and chroot): sudo bash tests/aarch64/run.sh"
fi
