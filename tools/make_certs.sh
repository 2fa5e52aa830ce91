#!/usr/bin/env bash
# Certificates and tokens for an edge server and its devices, with openssl alone:
#
#   tools/make_certs.sh OUT_DIR SERVER_NAME [DEVICE_ID ...]
#   tools/make_certs.sh /etc/edge/tls edge.local rpi4-01 jetson-01
#
# writes into OUT_DIR:
#   ca.pem, ca.key                 a CA of your own (keep ca.key offline once the certificates are made)
#   server.pem, server.key         the edge server's certificate: SERVER_NAME in its SAN (a DNS name or
#                                  an IP address), signed by the CA
#   DEVICE_ID.pem, DEVICE_ID.key   one client certificate per device, for mTLS
#   tokens                         "DEVICE_ID TOKEN" per line: edge-server --auth-tokens
#   DEVICE_ID.token                each device's own token: its profile's token_file
# Keys are EC P-256 and readable by their owner only; certificates last DAYS (default 825) days.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,16p' "$0"; exit 2; }
out=$1 server=$2
shift 2
days=${DAYS:-825}
mkdir -p "$out"
umask 077

key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1" 2>/dev/null; }

if [ ! -e "$out/ca.key" ]; then
    key "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=edge CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/ca.pem"
fi

sign() {  # sign NAME SUBJECT EXTENSIONS
    key "$out/$1.key"
    openssl req -new -key "$out/$1.key" -subj "$2" -out "$out/$1.csr"
    openssl x509 -req -in "$out/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile <(printf '%s\n' "$3") -out "$out/$1.pem" 2>/dev/null
    rm -f "$out/$1.csr"
}

if [[ $server =~ ^[0-9.]+$ || $server == *:* ]]; then san="IP:$server"; else san="DNS:$server"; fi
sign server "/CN=$server" "subjectAltName=$san
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"

: > "$out/tokens.new"
[ -e "$out/tokens" ] && grep -v -E "^($(IFS='|'; echo "${*:-^$}")) " "$out/tokens" >> "$out/tokens.new" || true
for device in "$@"; do
    sign "$device" "/CN=$device" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"
    token=$(openssl rand -hex 24)
    echo "$device $token" >> "$out/tokens.new"
    echo "$token" > "$out/$device.token"
done
mv "$out/tokens.new" "$out/tokens"
chmod 644 "$out"/*.pem
echo "wrote $out: ca.pem, server.pem/.key for $server${*:+, and for each of $*: DEVICE.pem/.key/.token}; tokens"
