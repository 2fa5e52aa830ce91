#!/usr/bin/env bash
# The aarch64 stage: a Debian bookworm arm64 root (debootstrap, Debian's packages) run under
# qemu-user, with edge installed as a Raspberry Pi user would (a venv, ai-edge-litert; then
# tflite-runtime with numpy < 2). In it: the split equivalence tests on every shipped and zoo
# model, on both backends; then an aarch64 device against the x86 server, compared with the
# aarch64 whole model (tests/aarch64/cross_isa.py). Needs root (binfmt_misc, chroot, mounts).
#
# The root is kept in $EDGE_ARM64_ROOT (default /var/tmp/edge-arm64-root) and reused when it is
# complete, so a second run skips debootstrap and pip.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
ROOT=${EDGE_ARM64_ROOT:-/var/tmp/edge-arm64-root}
START=$(date +%s)
say() { echo "== aarch64 [$(($(date +%s) - START)) s]: $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "the aarch64 stage needs root (binfmt_misc, debootstrap, chroot)" >&2
    exit 2
fi

if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
    say "installing debootstrap and qemu-user-static"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static >/dev/null
fi

# Register qemu-aarch64 with the F flag (the interpreter is opened now, so it works inside the chroot).
BINFMT=/proc/sys/fs/binfmt_misc
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
if [ -e "$BINFMT/qemu-aarch64" ] && ! grep -q '^flags: .*F' "$BINFMT/qemu-aarch64"; then
    echo -1 > "$BINFMT/qemu-aarch64"  # registered without F: the chroot could not open the interpreter
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    magic=$(cut -d: -f5 /usr/lib/binfmt.d/qemu-aarch64.conf)
    mask=$(cut -d: -f6 /usr/lib/binfmt.d/qemu-aarch64.conf)
    printf ':qemu-aarch64:M::%s:%s:/usr/bin/qemu-aarch64-static:OCF\n' "$magic" "$mask" > "$BINFMT/register"
fi

mounted=()
cleanup() {
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind SRC DST: mount SRC at DST inside the root, undone on exit
    mkdir -p "$ROOT$2"
    mount --bind "$1" "$ROOT$2"
    mounted+=("$ROOT$2")
}

if [ ! -e "$ROOT/.debootstrap-complete" ]; then
    rm -rf "$ROOT"
    # The mirror the machine's own apt uses (its first Debian source).
    mirror=$(grep -hoE '^URIs: *[^ ]+/debian/?$|^deb +[^ ]+/debian/? ' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
        | head -1 | awk '{print $2}' || true)
    say "debootstrap bookworm arm64 from $mirror (about 5 min)"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT" "$mirror" >/tmp/edge-debootstrap.log 2>&1 || {
        tail -20 /tmp/edge-debootstrap.log
        exit 1
    }
    touch "$ROOT/.debootstrap-complete"
fi

# What pip needs to reach the package index: names, the index settings and the CA bundle.
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
[ -d /etc/xdg/pip ] && mkdir -p "$ROOT/etc/xdg" && cp -r /etc/xdg/pip "$ROOT/etc/xdg/"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
# /proc and /dev, but never the host's /sys: XNNPACK then reads the host's CPU and crashes under qemu.
bind /proc /proc
bind /dev /dev
bind "$REPO" /src

in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-60}" "$@"
}
say "$(in_root uname -m), $(in_root python3 --version)"

if [ ! -e "$ROOT/.edge-complete" ]; then
    say "venvs as a Pi user makes them: ai-edge-litert, and tflite-runtime with numpy < 2 (about 4 min)"
    in_root python3 -m venv /opt/litert
    in_root /opt/litert/bin/pip install -q ai-edge-litert 'numpy>=2' flatbuffers pytest pydantic rich \
        grpcio grpcio-health-checking grpcio-reflection 'protobuf>=7.35.1,<8'
    in_root python3 -m venv /opt/tflite-runtime
    in_root /opt/tflite-runtime/bin/pip install -q 'tflite-runtime>=2.14' 'numpy<2' ai-edge-litert flatbuffers pytest \
        pydantic rich grpcio grpcio-health-checking grpcio-reflection 'protobuf>=7.35.1,<8'
    touch "$ROOT/.edge-complete"
fi

# The source tree, not an install: the tests import the working copy (PYTHONPATH).
run_tests() {  # run_tests VENV BACKEND
    in_root /usr/bin/env PYTHONPATH=/src EDGE_CACHE_DIR=/tmp/edge-cache /opt/"$1"/bin/python -m pytest -q \
        -p no:cacheprovider --rootdir=/src -c /src/pyproject.toml \
        /src/tests/edge/test_equivalence.py /src/tests/edge/test_zoo.py --backends "$2" 2>&1 | tail -3
}
say "split equivalence on litert"
run_tests litert litert
say "split equivalence on tflite-runtime"
run_tests tflite-runtime tflite-runtime

say "an aarch64 device against the x86 server"
LOG=$(mktemp)
python3 -m server --models "$REPO/edge/models" --host 127.0.0.1 --port 0 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; cleanup' EXIT
for _ in $(seq 100); do
    PORT=$(grep -oE 'listening on [^ ]*:[0-9]+' "$LOG" | grep -oE '[0-9]+$' | head -1 || true)
    [ -n "$PORT" ] && break
    sleep 0.2
done
[ -n "$PORT" ] || { cat "$LOG"; exit 1; }
in_root /usr/bin/env PYTHONPATH=/src /opt/litert/bin/python /src/tests/aarch64/cross_isa.py \
    --server "127.0.0.1:$PORT" --json /tmp/cross_isa.json
say "done"
