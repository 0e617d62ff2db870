#!/usr/bin/env bash
# Makes what the secured three-node stack (docker-compose.secure.yml) needs, into one folder:
#   ca.pem, ca.key          a private CA (keep ca.key offline in real use)
#   node.pem, node.key      the nodes' certificate (sb1, sb2, sb3, localhost, 127.0.0.1): TLS for
#                           clients on the public listener, and mutual TLS between the nodes
#   hs256.secret            the key tokens from your own issuer are signed with (HS256)
#   token-signing.secret    the key the broker's token endpoint signs its tokens with
#   operator.secret         the secret of the `operator` client (full rights, cluster admin)
#   switchboard.toml        the [auth] settings naming the files above, as the nodes see them
# Uses openssl, and the image itself to hash the client secret (argon2id).
#
# Usage: deploy/secure/make-secrets.sh [DIR]      (default deploy/secure/out; kept if present)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-deploy/secure/out}"
image="${SWITCHBOARD_IMAGE:-switchboard:local}"
if [ -f "$out/switchboard.toml" ]; then
    echo "$out already holds secrets; delete it to make new ones"
    exit 0
fi
mkdir -p "$out"
cd "$out"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=switchboard local CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=switchboard node" -keyout node.key -out node.csr 2>/dev/null
printf 'subjectAltName=DNS:sb1,DNS:sb2,DNS:sb3,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' > node.ext
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile node.ext -out node.pem 2>/dev/null
rm -f node.csr node.ext ca.srl

head -c 48 /dev/urandom | base64 | tr -d '\n' > hs256.secret
head -c 48 /dev/urandom | base64 | tr -d '\n' > token-signing.secret
head -c 32 /dev/urandom | base64 | tr -d '\n/+=' > operator.secret
hash="$(docker run --rm -i "$image" hash-secret --stdin < operator.secret | sed -n 's/^secret_hash = "\(.*\)"$/\1/p')"
[ -n "$hash" ] || { echo "error: could not hash the operator secret with $image" >&2; exit 1; }

cat > switchboard.toml <<TOML
# Written by deploy/secure/make-secrets.sh: authentication for the secured stack.
[auth]
hs256_secret_file = "/secrets/hs256.secret"
audiences = ["switchboard"]

[auth.token_endpoint]
signing_key_file = "/secrets/token-signing.secret"

[[auth.token_endpoint.clients]]
id = "operator"
secret_hash = "$hash"
token_ttl = "15m"
scope = { publish = [">"], subscribe = [">"], entities = { read = ["*"], update = ["*"] }, admin = true }
TOML
# The nodes run as root in a scratch image; keys stay unreadable to other users of this machine.
chmod 600 ./*.key ./*.secret
echo "secrets in $out (client id: operator, secret in $out/operator.secret)"
