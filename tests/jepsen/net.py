"""Network topology for the kmsd Jepsen suite (docs/reliability.md).

Namespace PFX-sw holds bridge br0; PFX-n<i> holds eth0 = 10.77.0.<i>/24 whose
peer PFX-p<i> is a port of br0; PFX-cl holds the clients at 10.77.0.100 and
has no default route, so no test packet can leave the machine. Faults are
nftables rules in the bridge (table bridge jepsen, chain cut): any graph of
cuts between node addresses, and numgen random loss per bridge port.
The client is never cut from a node: a cut node stays reachable from the
client, so stale answers from a minority are observable.
"""
import os
import subprocess

PFX = os.environ.get("JEPSEN_NS_PREFIX", "kj")
SW = f"{PFX}-sw"
CL = f"{PFX}-cl"
CLIENT_IP = "10.77.0.100"


def ns(i):
    return f"{PFX}-n{i}"


def ip_of(i):
    return f"10.77.0.{i}"


def port_of(i):
    return f"{PFX}-p{i}"


def sh(*cmd, check=True, input=None):
    p = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc={p.returncode}: {p.stderr.strip()}")
    return p


def nsexec(name, *cmd, check=True):
    return sh("ip", "netns", "exec", name, *cmd, check=check)


def _veth(name, idx, addr):
    v, p = f"{PFX}-v{idx}", port_of(idx)
    sh("ip", "netns", "add", name)
    sh("ip", "link", "add", v, "type", "veth", "peer", "name", p)
    sh("ip", "link", "set", v, "netns", name)
    sh("ip", "link", "set", p, "netns", SW)
    sh("ip", "-n", name, "link", "set", v, "name", "eth0")
    sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
    sh("ip", "-n", name, "link", "set", "eth0", "up")
    sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", SW, "link", "set", p, "master", "br0")
    sh("ip", "-n", SW, "link", "set", p, "up")


def up(n):
    down(n)
    sh("ip", "netns", "add", SW)
    sh("ip", "-n", SW, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", SW, "link", "set", "br0", "up")
    sh("ip", "-n", SW, "link", "set", "lo", "up")
    for i in range(1, n + 1):
        _veth(ns(i), i, ip_of(i))
    _veth(CL, 100, CLIENT_IP)
    sh("ip", "netns", "exec", SW, "nft", "-f", "-", input=(
        "table bridge jepsen {\n"
        "  chain cut { type filter hook forward priority 0; policy accept; }\n"
        "}\n"))


def down(n=9):
    existing = sh("ip", "netns", "list", check=False).stdout.split()
    for name in [CL, SW] + [ns(i) for i in range(1, max(n, 9) + 1)]:
        if name in existing:
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", name, check=False)


def heal():
    sh("ip", "netns", "exec", SW, "nft", "flush", "chain", "bridge", "jepsen", "cut")
    # links may have been set down by a port-level cut
    for line in sh("ip", "-n", SW, "-o", "link", "show", check=False).stdout.splitlines():
        if f"{PFX}-p" in line and "state DOWN" in line:
            dev = line.split(":")[1].strip().split("@")[0]
            sh("ip", "-n", SW, "link", "set", dev, "up", check=False)


def cut(pairs):
    """pairs: iterable of (i, j) node numbers; drops i<->j in both directions."""
    rules = []
    for i, j in pairs:
        rules.append(f"add rule bridge jepsen cut ip saddr {ip_of(i)} ip daddr {ip_of(j)} drop")
        rules.append(f"add rule bridge jepsen cut ip saddr {ip_of(j)} ip daddr {ip_of(i)} drop")
    if rules:
        sh("ip", "netns", "exec", SW, "nft", "-f", "-", input="\n".join(rules) + "\n")


def partition(groups, n):
    """groups: list of node lists; every pair in different groups is cut.
    Nodes not named in any group keep full connectivity (a bridge)."""
    pairs = []
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            for i in groups[a]:
                for j in groups[b]:
                    pairs.append((i, j))
    cut(pairs)
    return pairs


def loss(nodes, percent):
    """Random loss of packets sent by `nodes` into the bridge,
    between nodes only (client traffic is left alone)."""
    rules = []
    for i in nodes:
        rules.append(f"add rule bridge jepsen cut iifname {port_of(i)} ip saddr 10.77.0.1-10.77.0.99 "
                     f"ip daddr 10.77.0.1-10.77.0.99 numgen random mod 100 < {int(percent)} drop")
    sh("ip", "netns", "exec", SW, "nft", "-f", "-", input="\n".join(rules) + "\n")
