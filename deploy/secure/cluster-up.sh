#!/usr/bin/env bash
# The secured three-node stack in one command: build the image, make the secrets (once), start
# docker-compose.yml with docker-compose.secure.yml, and wait until every node is healthy. Then:
#   export SWITCHBOARD_CLIENT_ID=operator SWITCHBOARD_CLIENT_SECRET="$(cat deploy/secure/out/operator.secret)"
#   sb --server localhost:7410 --ca deploy/secure/out/ca.pem info
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/build-image.sh
deploy/secure/make-secrets.sh
SWITCHBOARD_COMPOSE_FILES="docker-compose.yml docker-compose.secure.yml" SWITCHBOARD_SKIP_BUILD=1 \
    deploy/cluster-up.sh "$@"
