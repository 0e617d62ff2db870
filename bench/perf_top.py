#!/usr/bin/env python3
"""Top functions by self time of one process in a `perf record` file (docs/BENCHMARKS.md).

    perf record -e cpu-clock -F 499 -o /tmp/perf-w1.data -- \
        ./target/release/switchboard-bench --only W1
    bench/perf_top.py /tmp/perf-w1.data                 # the processes in the file, by samples
    bench/perf_top.py /tmp/perf-w1.data PID [N] [THREAD] # PID's top N symbols (threads named THREAD*)

Recordings made with or without -g work (with -g, the leaf of each call chain is counted).

`perf report --pid` filters by thread, and a broker's threads have their own names, so this
groups `perf script` samples by process id itself. Percentages are of that process's samples.
"""
import collections
import re
import subprocess
import sys

LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")
HEADER = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s*$")
FRAME = re.compile(r"\s+([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$")


def samples(data):
    out = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,pid,tid,ip,sym,dso"],
        capture_output=True, text=True, check=True,
    ).stdout
    # A recording made with -g prints each sample as a "comm pid/tid" line followed by its call
    # chain, leaf first: the leaf is the frame that self time belongs to.
    pending = None
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            comm, pid, tid, _ip, sym, dso = match.groups()
        elif HEADER.match(line):
            pending = HEADER.match(line).groups()
            continue
        elif pending and FRAME.match(line):
            (comm, pid, tid), (_ip, sym, dso) = pending, FRAME.match(line).groups()
            pending = None
        else:
            continue
        yield comm, pid, tid, re.sub(r"\+0x[0-9a-f]+$", "", sym), dso.split("/")[-1]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    data = sys.argv[1]
    if len(sys.argv) == 2:
        count, names = collections.Counter(), {}
        for comm, pid, tid, _sym, _dso in samples(data):
            count[pid] += 1
            if pid == tid:
                names[pid] = comm
        for pid, n in count.most_common(10):
            print(f"{pid:>8} {names.get(pid, '?'):<16} {n} samples")
        return
    pid = sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    thread = sys.argv[4] if len(sys.argv) > 4 else ""
    syms, threads, dsos, n = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for comm, p, _tid, sym, dso in samples(data):
        if p != pid or not comm.startswith(thread):
            continue
        n += 1
        syms[(sym, dso)] += 1
        threads[re.sub(r"-?\d+$", "", comm)] += 1
        dsos[dso] += 1
    if n == 0:
        sys.exit(f"no samples for process {pid}")
    print(f"{n} samples")
    print("threads:", ", ".join(f"{c} {v * 100 / n:.0f}%" for c, v in threads.most_common(5)))
    print("objects:", ", ".join(f"{c} {v * 100 / n:.0f}%" for c, v in dsos.most_common(4)))
    for (sym, dso), v in syms.most_common(top):
        print(f"{v * 100 / n:6.2f}%  {sym[:100]}  [{dso}]")


if __name__ == "__main__":
    main()
