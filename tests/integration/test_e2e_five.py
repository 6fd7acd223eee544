#!/usr/bin/python3
"""A five-node kmsd cluster: init, unseal, round trips through every node,
and service with two of five nodes killed. Ports 27150-27199."""
import os
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kmslib import Cluster, check, finish, OK  # noqa: E402


def main():
    c = Cluster(nodes=5, base=27150)
    try:
        c.up()
        c.init()
        for i in range(1, 6):
            st = c.status(i)
            check(st and st["sealed"] is False and len(st.get("members", [])) == 5,
                  f"node {i} unsealed and sees 5 members")
        keys = []
        for i in range(1, 6):
            u = str(uuidlib.uuid4())
            rc, blob, data = c.seal(c.talos(i), u)
            check(rc == OK, f"seal through node {i}")
            keys.append((u, blob, data))
        for (u, blob, data) in keys:
            ok = all(c.unseal(c.talos(j), u, blob) == (OK, data) for j in range(1, 6))
            check(ok, f"key {u[:8]} unseals on all 5 nodes")
        # two of five down: quorum of three remains
        leader = c.wait_leader()
        victims = [leader, (leader % 5) + 1]
        for v in victims:
            c.kill9(v)
        alive = [i for i in range(1, 6) if i not in victims]
        t0 = time.time()
        rc = None
        while time.time() - t0 < 15:
            rc, blob, data = c.seal(c.endpoints(alive), str(uuidlib.uuid4()))
            if rc == OK:
                break
        check(rc == OK, f"seal works with nodes {victims} killed ({time.time() - t0:.1f}s)")
        for (u, blob, data) in keys:
            check(c.unseal(c.endpoints(alive), u, blob) == (OK, data),
                  f"key {u[:8]} unseals with two of five nodes down")
    finally:
        c.down()
    finish()


if __name__ == "__main__":
    main()
