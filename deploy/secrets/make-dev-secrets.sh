#!/usr/bin/env bash
# Development credentials for docker-compose.yml (TLS on the gRPC port and bearer tokens):
#   deploy/secrets/make-dev-secrets.sh [OUTPUT_FOLDER]      (default: deploy/secrets)
# writes ca.crt (a throw-away CA), tls.crt / tls.key (a server certificate for localhost,
# 127.0.0.1 and the compose service name mcdropout, signed by that CA), client.crt /
# client.key (a client certificate signed by it, for mutual TLS) and tokens (one random bearer
# token). Existing files are kept: delete them to make new ones. For development only: the keys
# are readable by everyone so that the container's user (uid 10001) can read the bind mounts;
# in production use your own PKI and a secret store (Kubernetes: deploy/kubernetes).
set -euo pipefail
out="${1:-$(dirname "$0")}"
mkdir -p "$out"
cd "$out"
days=365
if [[ ! -f ca.crt ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=mcdropout development CA" -keyout ca.key -out ca.crt \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
fi
issue() {  # issue NAME EXTENSIONS
  [[ -f "$1.crt" ]] && return
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=mcdropout $1" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf '%s\n' "$2" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue tls "subjectAltName=DNS:localhost,DNS:mcdropout,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue client "extendedKeyUsage=clientAuth"
if [[ ! -f tokens ]]; then
  # One token alone on its line: the server reads one per line, the client's --token-file
  # sends the file's content.
  openssl rand -hex 32 > tokens
fi
chmod 0644 ca.crt tls.crt tls.key client.crt client.key tokens
chmod 0600 ca.key
echo "development credentials in $(pwd): ca.crt tls.crt tls.key client.crt client.key tokens"
