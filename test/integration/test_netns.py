# Network slots (netns/) for real, as root, without touching the machine's own network:
#
#   the test "host"   a network namespace this test creates (bind-mounted in its temp dir);
#                     netns-tool runs in it as the agent would in the real root namespace
#   the "internet"    another namespace behind the host's uplink0 (203.0.113.0/24)
#   slots             made by netns-tool, bind-mounted in the temp dir
#   guests            guest-standin: a namespace per guest, 169.254.0.21, frames relayed to
#                     the slot's tap0 as a VMM does
#
# Traffic only flows between these namespaces. Everything is removed at teardown.

import json
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BUILD, SLOW, SRCDIR, wait_for

TOOL = os.path.join(BUILD, "test", "netns-tool")
STANDIN = os.path.join(BUILD, "test", "guest-standin")
PROBE = os.path.join(SRCDIR, "test", "net", "probe.py")
PY = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def sh(*args, check=True, timeout=60):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args}: {r.returncode}\n{r.stdout}{r.stderr}")
    return r


class Net:
    def __init__(self, root):
        self.root = root
        self.host = os.path.join(root, "host")
        self.inet = os.path.join(root, "inet")
        self.nsdir = os.path.join(root, "ns")
        self.state = os.path.join(root, "slots.json")
        self.procs = []

    def ns(self, path, *args, **kw):
        return sh("nsenter", f"--net={path}", *args, **kw)

    def opts(self, pool=4):
        return ["--netns-dir", self.nsdir, "--state", self.state, "--sandbox-cidr",
                "10.200.0.0/16", "--veth-cidr", "10.201.0.0/16", "--uplink", "uplink0",
                "--pool", str(pool)]

    def snapshot(self):
        """What the host namespace has: links, routes, rules."""
        links = sorted(l.split()[0].split("@")[0]
                       for l in self.ns(self.host, "ip", "-br", "link").stdout.splitlines())
        routes = sorted(self.ns(self.host, "ip", "route").stdout.splitlines())
        rules = self.ns(self.host, "nft", "list", "ruleset").stdout
        return links, routes, rules

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)
        self.procs.append(p)
        return p


@pytest.fixture
def net():
    root = tempfile.mkdtemp(prefix="ember-net-", dir="/tmp")
    n = Net(root)
    try:
        for path in (n.host, n.inet):
            open(path, "w").close()
            sh("unshare", f"--net={path}", "true")
        os.makedirs(n.nsdir)
        n.ns(n.host, "ip", "link", "set", "lo", "up")
        n.ns(n.inet, "ip", "link", "set", "lo", "up")
        # the uplink: host uplink0 203.0.113.1 <-> "internet" eth0 203.0.113.2
        n.ns(n.host, "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0",
             "netns", n.inet)
        n.ns(n.host, "ip", "addr", "add", "203.0.113.1/24", "dev", "uplink0")
        n.ns(n.host, "ip", "link", "set", "uplink0", "up")
        n.ns(n.host, "ip", "route", "add", "default", "via", "203.0.113.2")
        n.ns(n.inet, "ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
        n.ns(n.inet, "ip", "link", "set", "eth0", "up")
        n.initial = n.snapshot()
        yield n
    finally:
        for p in n.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if os.path.exists(n.host):
            sh("nsenter", f"--net={n.host}", TOOL, *n.opts(), "reclaim", check=False)
        for f in os.listdir(n.nsdir) if os.path.isdir(n.nsdir) else []:
            sh("umount", "-l", os.path.join(n.nsdir, f), check=False)
        sh("umount", "-R", "-l", n.nsdir, check=False)
        for path in (n.host, n.inet):
            sh("umount", "-l", path, check=False)
        shutil.rmtree(root, ignore_errors=True)


class Driver:
    """netns-tool serve in the test host namespace."""

    def __init__(self, net, pool=4):
        self.net = net
        self.p = net.start(["nsenter", f"--net={net.host}", TOOL, *net.opts(pool), "serve"])

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline().strip()
        if not out.startswith("ok"):
            raise AssertionError(f"{line}: {out or self.p.stderr.read()}")
        return dict(kv.split("=", 1) for kv in out.split()[1:])

    def try_cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def quit(self):
        self.cmd("quit")
        assert self.p.wait(30) == 0


def start_guest(net, slot_path, name):
    guest = os.path.join(net.root, f"guest-{name}")
    p = net.start([STANDIN, slot_path, guest, "--echo", "7"])
    line = p.stdout.readline().strip()
    assert line == "READY", p.stderr.read()
    return guest


def echo_many(net, ns, hosts, timeout=2.0):
    out = net.ns(ns, PY, PROBE, "echo-many", "7", str(timeout), *hosts,
                 timeout=60 + len(hosts) * timeout).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_fifty_slots_reachable_and_isolated(net):
    d = Driver(net, pool=4)
    slots = [d.cmd(f"acquire g{i}") for i in range(50)]
    assert len({s["ip"] for s in slots}) == 50
    assert len({s["path"] for s in slots}) == 50
    guests = [start_guest(net, s["path"], i) for i, s in enumerate(slots)]
    # every guest has the same address, behind its own slot
    for g in (guests[0], guests[49]):
        assert "169.254.0.21/30" in net.ns(g, "ip", "-br", "addr").stdout
    # reachable from the host at its sandbox IP: a TCP echo through the relay
    res = echo_many(net, net.host, [s["ip"] for s in slots])
    assert all(v == "ok" for v in res.values()), {k: v for k, v in res.items() if v != "ok"}

    # a listener on the host, for "the host's other addresses"
    srv = net.start(["nsenter", f"--net={net.host}", PY, PROBE, "whoami-server", "9999"])
    assert srv.stdout.readline().strip() == "READY"
    # every guest, at once: its neighbour's sandbox IP (echo port 7) and the host's uplink,
    # veth and own sandbox addresses (port 9999) stay out of reach
    probes = []
    for i in range(50):
        targets = [slots[(i + 1) % 50]["ip"]]
        probes.append((i, "neighbour", subprocess.Popen(
            ["nsenter", f"--net={guests[i]}", PY, PROBE, "echo-many", "7", "0.7", *targets],
            stdout=subprocess.PIPE, text=True)))
        for host_addr in ("203.0.113.1", f"10.201.0.{(2 * i) % 256}", slots[i]["ip"]):
            probes.append((i, host_addr, subprocess.Popen(
                ["nsenter", f"--net={guests[i]}", PY, PROBE, "ask", host_addr, "9999", "0.7"],
                stdout=subprocess.PIPE, text=True)))
    leaks = []
    for i, what, p in probes:
        out = p.communicate(timeout=60)[0]
        if "ok" in out.split():
            leaks.append((i, what, out))
    assert not leaks, leaks

    # unless allowed: live policy change on slot 0
    d.cmd(f"policy g0 allow=203.0.113.1,{slots[1]['ip']}")
    r = net.ns(guests[0], PY, PROBE, "ask", "203.0.113.1", "9999", "2").stdout.split()
    assert r[0] == "ok" and r[1] == slots[0]["ip"], r  # the host sees the sandbox IP
    assert echo_many(net, guests[0], [slots[1]["ip"]])[slots[1]["ip"]] == "ok"
    # and not for the others
    assert net.ns(guests[2], PY, PROBE, "ask", "203.0.113.1", "9999", "0.7").stdout.startswith(
        "fail")
    d.quit()


def test_egress_policy(net):
    d = Driver(net, pool=1)
    srv = net.start(["nsenter", f"--net={net.inet}", PY, PROBE, "whoami-server", "8080"])
    assert srv.stdout.readline().strip() == "READY"
    s = d.cmd("acquire eg internet")
    g = start_guest(net, s["path"], "eg")

    def ask(timeout="2"):
        return net.ns(g, PY, PROBE, "ask", "203.0.113.2", "8080", timeout).stdout.split()

    # internet on: the "internet" host sees the uplink's address (masquerade)
    assert ask() == ["ok", "203.0.113.1"]
    d.cmd("policy eg")  # internet off: dropped
    assert ask("0.7")[0] == "fail"
    d.cmd("policy eg allow=203.0.113.2")  # off, but this address allowed
    assert ask() == ["ok", "203.0.113.1"]
    d.cmd("policy eg internet deny=203.0.113.0/24")  # on, but this range denied
    assert ask("0.7")[0] == "fail"
    d.cmd("policy eg internet deny=198.51.100.0/24")
    assert ask() == ["ok", "203.0.113.1"]
    # the metadata address and private ranges stay closed even with internet on
    rules = net.ns(s["path"], "nft", "list", "set", "ip", "ember", "denied_default").stdout
    assert "169.254.0.0/16" in rules and "10.0.0.0/8" in rules
    # bad input is refused and changes nothing
    out = d.try_cmd("policy eg internet allow=10.0.0.1/8")
    assert out.startswith("error") and "10.0.0.1/8" in out
    assert ask() == ["ok", "203.0.113.1"]
    d.quit()


def test_release_and_reacquire_leave_nothing_stale(net):
    d = Driver(net, pool=0)
    baseline = None
    for i in range(3):
        s = d.cmd(f"acquire r{i}")
        assert os.path.exists(s["path"])
        d.cmd(f"release r{i}")
        assert not os.path.exists(s["path"])
        snap = net.snapshot()
        baseline = baseline or snap
        assert snap == baseline  # the same after every cycle: nothing accumulates
    links, routes, rules = baseline
    assert links == net.initial[0] and routes == net.initial[1]
    assert "masquerade" in rules  # the host's table, there while the pool lives
    d.quit()
    # reclaim with nothing kept: exactly the initial links, routes and rules
    sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim")
    assert net.snapshot() == net.initial


def test_state_survives_restart_and_reclaim_keeps_owners(net):
    d = Driver(net, pool=2)
    a = d.cmd("acquire keep1")
    b = d.cmd("acquire drop1")
    d.quit()  # "agent restart": ready slots go, slots in use stay
    assert os.path.exists(a["path"]) and os.path.exists(b["path"])
    with open(net.state) as f:
        owners = {s["owner"] for s in json.load(f)["slots"]}
    assert owners == {"keep1", "drop1"}
    r = sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim", "keep1").stdout
    assert "slots_forgotten=1" in r
    assert os.path.exists(a["path"]) and not os.path.exists(b["path"])
    d = Driver(net, pool=2)
    # the kept slot is known again and its number is not handed out twice
    out = d.try_cmd("acquire keep1")
    assert out.startswith("error") and "already has slot" in out
    c = d.cmd("acquire new1")
    assert c["index"] != a["index"]
    d.cmd("release keep1")
    d.cmd("release new1")
    d.quit()


def test_sigkill_mid_acquire_then_reclaim(net):
    for delay in (0.01, 0.05, 0.1, 0.3):
        p = net.start(["nsenter", f"--net={net.host}", TOOL, *net.opts(pool=2), "cycles",
                       "100000"])
        time.sleep(delay * SLOW + random.random() * 0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim")
        assert net.snapshot() == net.initial, f"after SIGKILL at {delay}s"
        assert os.listdir(net.nsdir) == []


def test_500_cycles_leak_nothing(net):
    r = sh("nsenter", f"--net={net.host}", TOOL, *net.opts(pool=2), "cycles", "500",
           timeout=600).stdout
    kv = dict(x.split("=") for x in r.split())
    assert kv["cycles"] == "500"
    assert kv["fds_before"] == kv["fds_after"], kv
    assert os.listdir(net.nsdir) == []  # the pool's ready slots went with the tool
    links, routes, _ = net.snapshot()
    assert links == net.initial[0] and routes == net.initial[1]
    sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim")
    assert net.snapshot() == net.initial


def state_of(net):
    """The slot state as netns/ would load it: the snapshot, then the journal's newer lines."""
    with open(net.state) as f:
        snap = json.load(f)
    owners = {s["index"]: s["owner"] for s in snap["slots"]}
    broken = set(snap.get("broken", []))
    journal = net.state + ".journal"
    if os.path.exists(journal):
        with open(journal) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                c = json.loads(line)
                if c["gen"] <= snap.get("gen", 0):
                    continue
                owners.pop(c["index"], None)
                broken.discard(c["index"])
                if "owner" in c:
                    owners[c["index"]] = c["owner"]
                elif c.get("broken"):
                    broken.add(c["index"])
    return owners, broken


def test_found_reference_outlives_release(net):
    """A slot found on one thread is not freed by a release on another, and a policy change
    through a stale reference never reaches the next slot with the same number."""
    d = Driver(net, pool=0)
    a = d.cmd("acquire ra")
    d.cmd("hold h ra")
    d.cmd("release ra")
    # still readable through the reference (ASan builds catch a use after free here)
    assert d.cmd("held h") == {"index": a["index"], "owner": "ra", "path": a["path"]}
    b = d.cmd("acquire rb")
    assert b["index"] == a["index"] and b["path"] == a["path"]  # the number is reused
    out = d.try_cmd("policy-held h internet allow=198.51.100.0/24")
    assert out.startswith("error") and "not in use" in out, out
    chain = net.ns(b["path"], "nft", "list", "chain", "ip", "ember", "internet").stdout
    assert "accept" not in chain  # rb's default policy untouched
    assert "198.51.100.0" not in net.ns(b["path"], "nft", "list", "set", "ip", "ember",
                                        "allow").stdout
    out = d.try_cmd("release-held h")  # consumes the reference, releases nothing
    assert out.startswith("error") and "not in use" in out, out
    assert d.cmd("stats")["in_use"] == "1"
    # a reference held while the slot is in use works like the owner's
    d.cmd("hold h2 rb")
    d.cmd("policy-held h2 internet")
    assert "accept" in net.ns(b["path"], "nft", "list", "chain", "ip", "ember",
                              "internet").stdout
    d.cmd("release-held h2")
    assert not os.path.exists(b["path"])
    assert d.try_cmd("release rb").startswith("error")
    assert d.cmd("stats")["in_use"] == "0"
    d.quit()


@pytest.mark.parametrize("pool", [0, 2])
def test_concurrent_acquires_for_one_owner(net, pool):
    d = Driver(net, pool=pool)
    for i in range(4):
        if pool:
            d.cmd("wait-ready 10000")
        r = d.cmd(f"race same{i} 12")
        assert r == {"won": "1", "eexist": "11", "failed": "0"}, r
    assert d.cmd("stats")["in_use"] == "4"
    owners, _ = state_of(net)
    assert sorted(owners.values()) == [f"same{i}" for i in range(4)]
    links = [l for l in net.snapshot()[0] if l.startswith("em-")]
    assert len(links) == 4 + pool  # no second slot built behind anyone's back
    for i in range(4):
        d.cmd(f"release same{i}")
    d.quit()


def test_fifty_concurrent_creates(net):
    d = Driver(net, pool=4)
    d.cmd("wait-ready 10000")
    r = d.cmd("burst c 50")
    assert r["ok"] == "50" and r["distinct"] == "50", r
    st = d.cmd("stats")
    assert st["in_use"] == "50"
    owners, _ = state_of(net)
    assert sorted(owners.values()) == sorted(f"c{i}" for i in range(50))
    for i in range(50):
        d.cmd(f"release c{i}")
    assert state_of(net)[0] == {}
    d.quit()


@pytest.fixture
def immutable(net):
    """chattr +i/-i on the slot directory: removing a namespace there then fails."""
    if not shutil.which("chattr"):
        pytest.skip("no chattr")
    touched = []

    def set_(on):
        sh("chattr", "+i" if on else "-i", net.nsdir)
        touched.append(on)

    yield set_
    if touched:
        sh("chattr", "-i", net.nsdir, check=False)


def test_failed_destroy_keeps_number_out_of_use(net, immutable):
    d = Driver(net, pool=0)
    a = d.cmd("acquire fa")
    assert a["index"] == "0"
    try:
        immutable(True)
    except AssertionError:
        pytest.skip("the file system does not take chattr +i")
    out = d.try_cmd("release fa")
    assert out.startswith("error") and "not fully removed" in out, out
    st = d.cmd("stats")
    assert st["broken"] == "1" and st["in_use"] == "0"
    assert state_of(net) == ({}, {0})
    immutable(False)
    # not handed out again, although it is the lowest number
    b = d.cmd("acquire fb")
    assert b["index"] == "1"
    # until the background retry has removed what was left
    wait_for(lambda: d.cmd("stats")["broken"] == "0", 15 * SLOW, "the retry")
    assert not os.path.exists(a["path"])
    assert state_of(net) == ({1: "fb"}, set())
    c = d.cmd("acquire fc")
    assert c["index"] == "0"
    d.cmd("release fb")
    d.cmd("release fc")

    # a broken number survives a restart, and a reclaim clears it
    a = d.cmd("acquire fa")
    immutable(True)
    assert d.try_cmd("release fa").startswith("error")
    d.quit()
    with open(net.state) as f:
        assert json.load(f)["broken"] == [0]
    immutable(False)
    sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim")
    assert state_of(net) == ({}, set())
    assert os.listdir(net.nsdir) == []
    d = Driver(net, pool=0)
    assert d.cmd("acquire fd")["index"] == "0"
    d.cmd("release fd")
    d.quit()


class Monitor:
    """nft monitor in a slot; marker tables, added and later removed, bracket what is
    watched."""

    def __init__(self, net, path):
        self.net, self.path, self.n = net, path, 0
        self.p = net.start(["nsenter", f"--net={path}", "stdbuf", "-oL", "nft", "monitor"])
        self.lines, self.buf = [], b""
        # the monitor subscribes at some point after it starts: mark until it sees one
        while not self.mark(timeout=0.5):
            pass

    def readline(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.p.stdout.fileno(), 4096)
            assert chunk, "nft monitor ended"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode().strip()

    def mark(self, timeout=10.0):
        """Adds a marker table; the number of lines seen up to it, None if not seen."""
        self.n += 1
        name = f"marker{self.n}"
        self.net.ns(self.path, "nft", "add", "table", "ip", name)
        deadline = time.monotonic() + timeout * SLOW
        seen = False
        while (line := self.readline(deadline)) is not None:
            self.lines.append(line)
            seen = seen or line == f"add table ip {name}"
            # the transaction's generation line comes after what it did
            if seen and line.startswith("# new generation"):
                return len(self.lines)
        assert timeout < 10, "nft monitor did not show " + name
        return None

    def between(self, a, b):
        """What happened between two marks (the second's own lines left out)."""
        return self.lines[a:b - 2]

    def close(self):
        for i in range(1, self.n + 1):
            self.net.ns(self.path, "nft", "delete", "table", "ip", f"marker{i}")
        self.p.terminate()


def test_pooled_handout_nft_work(net):
    """A ready slot has the default policy in place: handing it out with that policy is no
    nftables work at all, and with another policy one transaction."""
    d = Driver(net, pool=1)
    d.cmd("wait-ready 10000")
    path = os.path.join(net.nsdir, "ember-0")
    m = Monitor(net, path)
    a = m.mark()
    s = d.cmd("acquire dflt")
    assert s["path"] == path
    b = m.mark()
    assert [l for l in m.between(a, b) if not l.startswith("# new generation")] == []
    assert len([l for l in m.between(a, b) if l.startswith("# new generation")]) == 0
    m.close()

    d.cmd("wait-ready 10000")
    path = os.path.join(net.nsdir, "ember-1")
    m = Monitor(net, path)
    a = m.mark()
    s = d.cmd("acquire pol internet allow=198.51.100.0/24 deny=203.0.113.7")
    assert s["path"] == path
    b = m.mark()
    gens = [l for l in m.between(a, b) if l.startswith("# new generation")]
    assert len(gens) == 1, m.between(a, b)
    m.close()
    rules = net.ns(path, "nft", "list", "table", "ip", "ember").stdout
    assert "198.51.100.0/24" in rules and "203.0.113.7" in rules and "accept" in rules
    d.cmd("release dflt")
    d.cmd("release pol")
    d.quit()


def test_journal_survives_sigkill(net):
    d = Driver(net, pool=1)
    a = d.cmd("acquire keep2")
    d.cmd("acquire drop2")
    d.cmd("acquire gone2")
    d.cmd("release gone2")
    d.p.send_signal(signal.SIGKILL)  # no snapshot at exit: the journal must do
    d.p.wait()
    owners, _ = state_of(net)
    assert sorted(owners.values()) == ["drop2", "keep2"]
    with open(net.state) as f:
        assert json.load(f)["slots"] == []  # all of it in the journal
    r = sh("nsenter", f"--net={net.host}", TOOL, *net.opts(), "reclaim", "keep2").stdout
    assert "slots_forgotten=1" in r
    assert not os.path.exists(net.state + ".journal")
    assert state_of(net) == ({int(a["index"]): "keep2"}, set())
    d = Driver(net, pool=1)
    assert "already has slot" in d.try_cmd("acquire keep2")
    d.cmd("release keep2")
    d.quit()


def test_state_file_from_another_boot_lists_nothing(net):
    with open(net.state, "w") as f:
        json.dump({"boot_id": "00000000-0000-0000-0000-000000000000", "gen": 3,
                   "slots": [{"index": 0, "owner": "old"}], "broken": [1]}, f)
    with open(net.state + ".journal", "w") as f:
        f.write('{"gen": 4, "index": 2, "owner": "older"}\n')
    d = Driver(net, pool=0)
    st = d.cmd("stats")
    assert st["in_use"] == "0" and st["broken"] == "0"
    assert d.cmd("acquire new0")["index"] == "0"
    d.cmd("release new0")
    d.quit()
    # and garbage from this boot is refused, not guessed at
    with open(net.state, "w") as f:
        f.write('{"slots": [{"index": 0}]}')
    r = sh("nsenter", f"--net={net.host}", TOOL, *net.opts(pool=0), "cycles", "1",
           check=False)
    assert r.returncode != 0 and "not a slot state file" in r.stderr, r.stderr
    os.unlink(net.state)
