#!/usr/bin/env bash
# One command for the three-node stack, offline: build the image from this checkout (no registry,
# no base image), start docker-compose.yml, and wait until every node reports healthy.
# COMPOSE_PROFILES=replicas adds the two read replicas sb4 and sb5 (docs/CLUSTER.md).
# Extra arguments go to `up` (e.g. --force-recreate).
set -euo pipefail
cd "$(dirname "$0")/.."

# Compose v2 is a docker plugin; Debian ships v1 as `docker-compose`, which has no `up --wait`.
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    compose=(docker-compose)
fi

# SWITCHBOARD_COMPOSE_FILES: the compose files, in order (deploy/secure/cluster-up.sh adds the
# secured overlay); SWITCHBOARD_SKIP_BUILD=1 when the image was just built.
for file in ${SWITCHBOARD_COMPOSE_FILES:-docker-compose.yml}; do
    compose+=(-f "$file")
done
[ "${SWITCHBOARD_SKIP_BUILD:-}" = 1 ] || deploy/build-image.sh
"${compose[@]}" up -d "$@"

# Wait on the containers' own health checks (`switchboard --healthcheck`), with a deadline. With
# the replicas profile (COMPOSE_PROFILES=replicas), sb4 and sb5 too: a replica reports healthy once
# it was added and knows the leader, so this also waits for sb4-join and sb5-join to have run.
services=(sb1 sb2 sb3)
case ",${COMPOSE_PROFILES:-}," in
    *,replicas,*) services+=(sb4 sb5) ;;
esac
deadline=$((SECONDS + ${SWITCHBOARD_UP_TIMEOUT:-120}))
for service in "${services[@]}"; do
    id="$("${compose[@]}" ps -q "$service")"
    while true; do
        health="$(docker inspect --format '{{.State.Health.Status}}' "$id")"
        [ "$health" = healthy ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: $service is $health after ${SWITCHBOARD_UP_TIMEOUT:-120}s; its last log lines:" >&2
            docker logs --tail 20 "$id" >&2
            exit 1
        fi
        sleep 1
    done
    echo "$service healthy"
done
"${compose[@]}" ps
