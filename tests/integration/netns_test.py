#!/usr/bin/python3
"""A multi-host job on one machine: four network namespaces (`ip netns`) are
four hosts with their own addresses (10.200.0.1-4/24), each wired by a veth
pair to a bridge in a fifth "switch" namespace; no host can reach another's
127.0.0.1. Every host runs `distval-rank` as rank 0..3 of an emulated
mpirun (OMPI_COMM_WORLD_RANK/SIZE): hosts 1 and 2 serve (listening on every
address, advertising their own), hosts 3 and 4 train, and they meet through
a rendezvous directory. The job is trained to completion twice, BSP and
async, with `tc netem` adding 2 ms of delay on every host's link (when
the kernel has netem; said otherwise); the wall
times are printed (not asserted). Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN):
without it the test says why and exits 77 (skipped). Run by meson with
BUILD_DIR set."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("BUILD_DIR", os.path.join(ROOT, "build"))
DATA = "/usr/share/datasets/fashion-mnist"
TAG = f"dv{os.getpid() % 100000}"
SWITCH = f"{TAG}-sw"
HOSTS = [f"{TAG}-h{i}" for i in range(4)]
ADDRS = [f"10.200.0.{i + 1}" for i in range(4)]
SKIP = 77


def sh(*cmd, check=True):
    return subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=check)


def in_ns(ns, *cmd):
    return sh("ip", "netns", "exec", ns, *cmd)


def skip(reason):
    print(f"netns_test: SKIPPED: {reason}", file=sys.stderr)
    sys.exit(SKIP)


def check_privileges():
    if shutil.which("ip") is None:
        skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        skip("creating network namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN); "
             "CI runs this test as root")
    probe = f"{TAG}-probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        skip(f"`ip netns add` failed ({r.stdout.strip()}): no privilege for network namespaces here")
    sh("ip", "netns", "del", probe, check=False)


def build_network(delay_ms):
    """Builds the hosts and the switch; returns the delay actually added
    (0 when netem is not available)."""
    added = delay_ms if delay_ms > 0 and shutil.which("tc") else 0
    sh("ip", "netns", "add", SWITCH)
    in_ns(SWITCH, "ip", "link", "add", "br0", "type", "bridge")
    in_ns(SWITCH, "ip", "link", "set", "br0", "up")
    for i, (ns, addr) in enumerate(zip(HOSTS, ADDRS)):
        sh("ip", "netns", "add", ns)
        # The veth pair is created in the switch namespace (no interface
        # ever appears in the namespace running the test), then one end
        # moves to the host.
        in_ns(SWITCH, "ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", f"e{i}")
        in_ns(SWITCH, "ip", "link", "set", f"e{i}", "netns", ns)
        in_ns(SWITCH, "ip", "link", "set", f"p{i}", "master", "br0")
        in_ns(SWITCH, "ip", "link", "set", f"p{i}", "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "set", f"e{i}", "name", "eth0")
        in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        if added:
            r = sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
                   "delay", f"{delay_ms}ms", check=False)
            if r.returncode != 0:
                print(f"netns_test: running without netem delay ({r.stdout.strip()})",
                      file=sys.stderr)
                added = 0
    # The hosts reach each other through the switch (when ping exists).
    if shutil.which("ping"):
        deadline = time.time() + 10
        while sh("ip", "netns", "exec", HOSTS[3], "ping", "-c", "1", "-W", "1", ADDRS[0],
                 check=False).returncode != 0:
            if time.time() > deadline:
                raise AssertionError("host 4 cannot ping host 1 through the bridge")
            time.sleep(0.1)
    return added


def tear_down():
    for ns in HOSTS + [SWITCH]:
        sh("ip", "netns", "del", ns, check=False)


def run_job(tmp, staleness):
    """Starts rank i in host i; returns (wall seconds, outputs by rank)."""
    rdv = os.path.join(tmp, f"rdv-{staleness}")
    rank_bin = os.path.join(BUILD, "tools", "rank", "distval-rank")
    ps_bin = os.path.join(BUILD, "ps", "distval-ps")
    worker_bin = os.path.join(BUILD, "worker", "distval-worker")
    procs = []
    start = time.time()
    for rank, (ns, addr) in enumerate(zip(HOSTS, ADDRS)):
        env = dict(os.environ, OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="4")
        cmd = ["ip", "netns", "exec", ns, rank_bin, "--num-ps", "2", "--rendezvous", rdv,
               "--ps-bin", ps_bin, "--ps-arg=--bind=tcp://*:0", f"--ps-arg=--advertise-host={addr}",
               f"--ps-arg=--staleness={staleness}", "--",
               worker_bin, "--train-limit", "4000", "--epochs", "1", "--staleness", staleness,
               "--summary-json", os.path.join(tmp, f"summary-{staleness}-{{index}}.json")]
        log = open(os.path.join(tmp, f"rank-{staleness}-{rank}.log"), "w+")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    outputs = []
    for rank, (p, log) in enumerate(procs):
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise AssertionError(f"rank {rank} ({staleness}) did not finish")
        log.seek(0)
        out = log.read()
        log.close()
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} ({staleness}) exited {p.returncode}:\n{out[-4000:]}")
        outputs.append(out)
    return time.time() - start, outputs


def check_job(tmp, staleness, outputs):
    # Servers: each listened on every address and published its own host's.
    for rank in (0, 1):
        out = outputs[rank]
        assert f"role=ps index={rank} num_shards=2" in out, out
        assert "endpoint=tcp://0.0.0.0:" in out, out
        assert f"published tcp://{ADDRS[rank]}:" in out, out
        assert "shutdown requested" in out, out
    # Workers: connected to the other hosts' addresses and trained.
    for rank in (2, 3):
        out = outputs[rank]
        m = re.search(r"ps=(tcp://[^ ]+) mode=", out)
        assert m, out
        endpoints = m.group(1).split(",")
        assert [e.rsplit(":", 1)[0] for e in endpoints] == [f"tcp://{a}" for a in ADDRS[:2]], out
        assert "done: " in out, out
    summaries = []
    for w in (0, 1):
        with open(os.path.join(tmp, f"summary-{staleness}-{w}.json")) as f:
            summaries.append(json.load(f))
    assert [s["worker"] for s in summaries] == [0, 1]
    assert summaries[0]["steps"] == 4000 // 64, summaries[0]
    assert summaries[0]["test_accuracy"] > 0.55, summaries[0]
    return summaries


def main():
    check_privileges()
    if not os.path.exists(os.path.join(DATA, "t10k-images-idx3-ubyte.gz")):
        skip("Fashion-MNIST not installed")
    tmp = tempfile.mkdtemp(prefix="distval-netns-test-")
    try:
        delay = build_network(delay_ms=2)
        for staleness in ("0", "async"):
            wall, outputs = run_job(tmp, staleness)
            summaries = check_job(tmp, staleness, outputs)
            print(f"netns_test: {'bsp' if staleness == '0' else staleness}: 2 servers + 2 workers on 4 "
                  f"hosts, {delay} ms added link delay: {wall:.1f} s, worker 0 blocked "
                  f"{summaries[0]['blocked_seconds']:.2f} s, test accuracy "
                  f"{summaries[0]['test_accuracy']:.3f}")
    finally:
        tear_down()
        shutil.rmtree(tmp, ignore_errors=True)
    print("netns_test: OK")


if __name__ == "__main__":
    main()
