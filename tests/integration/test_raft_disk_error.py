#!/usr/bin/python3
"""Raft (g): a raft log write that fails (EIO injected into the leader's
io_submit with strace, as tests/jepsen's disk-eio scenario does) stops that
node in a controlled way: it logs the error and exits through SIGTERM,
never a crash inside libraft (raft 0.22.1 segfaulted in raft_apply after a
failed append). The other two elect a leader and commit; the node restarts
cleanly from its data dir and catches up."""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from raft_lib import Cluster, check, log, skip  # noqa: E402


def main():
    if shutil.which("strace") is None:
        skip("strace not installed")
    with Cluster("raft-disk-error", 25950, 3) as c:
        c.start_all()
        peers = c.initial()
        leader = c.wait_leader(15)
        r = leader.cmd("propose 100 200 4 10000", 60)
        check(r["committed"] == 100, "100 proposals committed")
        st = subprocess.Popen(["strace", "-f", "-qq", "-o", "/dev/null", "-p", str(leader.proc.pid),
                               "-e", "trace=io_submit,fdatasync,fsync",
                               "-e", "inject=io_submit,fdatasync,fsync:error=EIO:when=1+"])
        time.sleep(1.0)  # strace attached
        leader.send("propose 50 200 4 3000")
        t0 = time.monotonic()
        while leader.alive() and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        st.kill()
        st.wait()
        rc = leader.proc.returncode if not leader.alive() else None
        logtext = open(os.path.join(c.workdir, leader.logname), errors="replace").read()
        check(rc is not None, "the node whose log write failed stopped (rc %s)" % rc)
        check(rc == -15, "it stopped through SIGTERM, not a crash (rc %s; -11 = SIGSEGV)" % rc)
        check("raft log write failed" in logtext, "it logged the failed log write")
        leader._close_pipes()
        others = [n for n in peers if n is not leader]
        newl = c.wait_leader(15, among=others)
        r = newl.cmd("propose 50 200 4 10000", 30)
        check(r["committed"] == 50, "the other two elect node %d and commit" % newl.id)
        leader.start(peers=peers)
        d = c.wait_converged(timeout=40)
        check(d["count"] >= 150, "the node restarts from its data dir and catches up (%d records)"
              % d["count"])
    log("PASS")


if __name__ == "__main__":
    main()
