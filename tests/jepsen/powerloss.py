#!/usr/bin/python3
"""Power-loss emulation for one node's dataDir after SIGKILL (docs/reliability.md).

synclog.so recorded "<path> <size>" after every successful fsync/fdatasync.
A power cut loses what was written but not synced, so each file under
DATA/store is cut back to its last synced size; a RocksDB WAL (*.log) never
synced is cut to 0. With a seed, a random prefix of the unsynced tail is kept
(a torn write). DATA/raft is left alone: libraft writes its log with AIO
RWF_DSYNC writes (durable on completion) and fsyncs its metadata, which this
shim does not observe. Not modelled: lost directory entries (create/rename
without fsync of the directory), overwrites in the middle of a file.

  powerloss.py DATA_DIR SYNC_LOG [SEED]   prints what it cut, as JSON lines
"""
import json
import os
import random
import sys


def powerloss(data_dir, sync_log, seed=None):
    synced = {}
    if os.path.exists(sync_log):
        with open(sync_log, errors="replace") as f:
            for line in f:
                p, _, sz = line.rstrip("\n").rpartition(" ")
                if p and sz.isdigit():
                    synced[p] = int(sz)
    rng = random.Random(seed) if seed is not None else None
    cuts = []
    store = os.path.join(data_dir, "store")
    for root, _, files in os.walk(store):
        for name in sorted(files):
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            if path in synced:
                keep = min(size, synced[path])
            elif name.endswith(".log"):
                keep = 0
            else:
                continue
            if keep < size and rng is not None:
                keep += rng.randint(0, size - keep)
            if keep < size:
                os.truncate(path, keep)
                cuts.append({"file": path, "size": size, "kept": keep})
    return cuts


if __name__ == "__main__":
    for c in powerloss(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None):
        print(json.dumps(c))
