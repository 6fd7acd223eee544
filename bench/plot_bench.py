#!/usr/bin/python3
"""PNG plots from the JSON results of the benchmarks (docs/benchmarks.md).

  bench/plot_bench.py --seal seal.json --lat-dir DIR [--rack rack.json] --out docs/img

seal.json (bench_seal.py --json): Seal vs etcd Put throughput and p99 per
client count -> seal-throughput.png. DIR/rack-N.txt (bench_rackboot.py
--lat-dir): latency distribution of every Unseal of a rack boot ->
rackboot-latency.png. Installs python3-matplotlib (apt-get) when missing and
the user is root.
"""
import argparse
import json
import os
import subprocess
import sys


def need_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.geteuid() != 0:
            sys.exit("plot_bench: apt-get install python3-matplotlib")
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                        "python3-matplotlib"], check=True, timeout=900,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seal")
    ap.add_argument("--rack")
    ap.add_argument("--lat-dir")
    ap.add_argument("--out", default="docs/img")
    a = ap.parse_args()
    plt = need_matplotlib()
    os.makedirs(a.out, exist_ok=True)
    if a.seal:
        with open(a.seal) as f:
            s = json.load(f)["summary"]
        x = [r["clients"] for r in s]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(x, [r["kmsd_per_s"] for r in s], "o-", label="kmsd Seal (3 nodes, TLS)")
        ax1.plot(x, [r["etcd_per_s"] for r in s], "s--", label="etcd 3.4 Put (3 members)")
        ax1.set_xscale("log", base=2)
        ax1.set_xlabel("concurrent clients")
        ax1.set_ylabel("committed writes / s (median of rounds)")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.plot(x, [r["kmsd_p99_ms"] for r in s], "o-", label="kmsd p99")
        ax2.plot(x, [r["etcd_p99_ms"] for r in s], "s--", label="etcd p99")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("concurrent clients")
        ax2.set_ylabel("latency ms")
        ax2.legend()
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "seal-throughput.png"), dpi=90)
        print(os.path.join(a.out, "seal-throughput.png"))
    if a.lat_dir:
        files = sorted(f for f in os.listdir(a.lat_dir) if f.startswith("rack-"))
        if files:
            fig, ax = plt.subplots(figsize=(7, 4))
            for fn in files:
                with open(os.path.join(a.lat_dir, fn)) as f:
                    lat = sorted(float(l) for l in f if l.strip())
                if not lat:
                    continue
                ys = [100.0 * (i + 1) / len(lat) for i in range(len(lat))]
                ax.plot(lat, ys, label=fn[5:-4] + " nodes x 3 volumes")
            ax.axvline(10000, color="red", linestyle=":", label="Talos deadline 10 s")
            ax.set_xscale("log")
            ax.set_xlabel("Unseal latency ms (new TLS connection each)")
            ax.set_ylabel("% of unseals at or below")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(os.path.join(a.out, "rackboot-latency.png"), dpi=90)
            print(os.path.join(a.out, "rackboot-latency.png"))


if __name__ == "__main__":
    main()
