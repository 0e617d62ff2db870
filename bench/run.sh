#!/usr/bin/env bash
# The side-by-side benchmark of Switchboard against NATS JetStream (docs/BENCHMARKS.md).
#
#   bench/run.sh                  # the whole comparison, three rounds: ~5 minutes on 2 cores once built
#   bench/run.sh --quick          # every workload scaled down ~10x, one round: a smoke run
#   bench/run.sh --only W1,W3     # some workloads (W1, W2, W2a, W2b, W2e, W3, W4)
#   bench/run.sh --rounds 5       # more rounds (the table shows each figure's median)
#   bench/run.sh --stalled        # instead: Switchboard's memory with 10,240 subscribers that never
#                                 # read (~1-2 minutes; not part of the comparison; see
#                                 # docs/BENCHMARKS.md, "Memory with subscribers that never read")
#
# Installs Debian's nats-server when it is missing (apt-get, as root or through sudo), builds the
# release binaries, runs bench/ (switchboard-bench) with any flags given here, prints the table
# and writes the results to bench/results/<date>.json (<date>-quick.json for --quick runs; a
# later run of the same day adds its time, <date>-<hhmmss>.json, rather than replace a file).
# Loads go to loopback only; every broker is started, measured and stopped by the tool, with its
# data in a temporary folder it removes. Not part of the test suite: CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

stalled=""
for arg in "$@"; do
    if [ "$arg" = --stalled ]; then stalled=1; fi
done

nats_server="$(command -v nats-server || true)"
if [ -z "$nats_server" ] && [ -x /usr/sbin/nats-server ]; then
    nats_server=/usr/sbin/nats-server
fi
if [ -z "$nats_server" ] && [ -z "$stalled" ]; then
    echo "== installing nats-server (Debian package)" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
    nats_server="$(command -v nats-server || echo /usr/sbin/nats-server)"
fi
if [ -z "$stalled" ]; then
    echo "== $("$nats_server" --version)" >&2
fi

echo "== building release binaries" >&2
cargo build --release --locked --bin switchboard --bin switchboard-bench

suffix=""
for arg in "$@"; do
    case "$arg" in
        --quick) suffix="-quick" ;;
        --only|--only=*) suffix="${suffix:--partial}" ;;
        --stalled) suffix="-stalled" ;;
    esac
done
mkdir -p bench/results
out="bench/results/$(date -u +%Y-%m-%d)${suffix}.json"
if [ -e "$out" ]; then
    out="bench/results/$(date -u +%Y-%m-%d-%H%M%S)${suffix}.json"
fi

what="comparison"
if [ -n "$stalled" ]; then what="memory benchmark"; fi
echo "== running the $what (results: $out)" >&2
./target/release/switchboard-bench \
    --switchboard target/release/switchboard \
    --nats-server "${nats_server:-nats-server}" \
    --json "$out" \
    "$@"
