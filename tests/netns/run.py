#!/usr/bin/env python3
"""cachecast on separate hosts: network namespaces behind a policy-drop
firewall, real network faults, and a soak that checks the delivery
guarantee end to end, from what each application received.

    sudo python3 tests/netns/run.py [--hosts 5] [--passes N] [--bin PATH]

Needs root (namespaces, nftables), iproute2, nftables, setpriv and a built
`cachecast` (`cargo build --features cli`, the default `--bin`).

The network: one namespace holds a bridge; each host is a namespace of its
own with one veth on that bridge, an address in 10.201.77.0/24 (a subnet
that exists only inside these namespaces) and a name the others resolve
through /etc/netns/NAME/hosts. The machine's own interfaces, routes and
rule sets are never touched. A non-peer host ("outsider") sits on the same
bridge.

Each host: its own dhis.conf with host names and the default port 4001
(app2 uses the cluster.hostname/cluster.members form), a shared secret,
a state file, the sidecar running as an unprivileged user, an input policy
of drop and the nftables rules of docs/operations.md taken from the doc's
own text. Its application (`app.py`) sends a steady mix of invalidations
through the sidecar's HTTP API and reads SSE, reconnecting with
Last-Event-ID.

Faults run on a schedule while the applications send; afterwards, for
every ordered pair of hosts, every invalidation the origin accepted must
have been delivered, or a flush must have been received after it was
accepted. Everything it made (namespaces, processes, /etc/netns entries,
files) is removed at the end, also when a check fails or the run is
interrupted.

Exit status: 0 all checks held; 1 a check failed or the network could not
be made (unless --skip-unavailable, which makes that 0 with the reason).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SUBNET = "10.201.77"
PREFIX = "ccnet"
PORT = 4001
NOBODY = 65534


class CheckFailed(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd, check=True, timeout=30, input=None, env=None):
    r = subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, input=input, env=env
    )
    if check and r.returncode != 0:
        raise CheckFailed(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


# ---------------------------------------------------------------- the doc

def doc_firewall(doc):
    """The nftables commands of docs/operations.md's firewall section, and
    the example addresses they are written for."""
    m = re.search(r"^## Firewall\n(.*?)(?=^## )", doc, re.S | re.M)
    if not m:
        raise CheckFailed("docs/operations.md has no '## Firewall' section")
    section = m.group(1)
    ex = re.search(r"On ([\d.]+), with peers ([\d.]+) and ([\d.]+):", section)
    if not ex:
        raise CheckFailed("the firewall section no longer names its example addresses ('On A, with peers B and C:')")
    nft = re.search(r"^nftables.*?\n```sh\n(.*?)```", section, re.S | re.M)
    if not nft:
        raise CheckFailed("the firewall section has no nftables block")
    lines = [l.strip() for l in nft.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]
    return ex.group(1), [ex.group(2), ex.group(3)], lines


def firewall_for(doc_lines, example_peers, peers):
    """The doc's commands with its example peer addresses replaced by this
    host's peers: exactly what an operator following the doc types."""
    example_set = ", ".join(example_peers)
    out = []
    for line in doc_lines:
        line = line.replace(example_set, ", ".join(peers))
        for a in example_peers:
            if a in line:
                raise CheckFailed(f"doc rule {line!r} names example address {a} outside the peer set")
        out.append(line)
    return out


# ---------------------------------------------------------------- the network

class Host:
    def __init__(self, run, idx, name, addr):
        self.run, self.idx, self.name, self.addr = run, idx, name, addr
        self.ns = f"{PREFIX}{run.tag}{name}"
        self.dir = run.dir / name
        self.node = f"{name}:{PORT}"
        self.sidecar = None
        self.app = None
        self.peak_rss_kib = 0
        self.peers = []

    def exec(self, *cmd, check=True, timeout=30, env=None):
        return sh("ip", "netns", "exec", self.ns, *cmd, check=check, timeout=timeout, env=env)

    def nft(self, *args):
        return self.exec("nft", *args)


class Cluster:
    def __init__(self, args):
        self.args = args
        self.tag = str(os.getpid())
        self.dir = Path(tempfile.mkdtemp(prefix="cachecast-netns-"))
        os.chmod(self.dir, 0o755)
        n = args.hosts
        self.hosts = [Host(self, i, f"app{i}", f"{SUBNET}.{10 + i}") for i in range(1, n + 1)]
        self.outsider = Host(self, 0, "outsider", f"{SUBNET}.99")
        self.bridge = f"{PREFIX}{self.tag}bridge"
        self.made_ns = []
        self.procs = []
        self.faults = []
        self.bin = None
        # /etc/netns is removed again if this run made it.
        self.made_etc_netns = not Path("/etc/netns").exists()

    # ---- building
    def namespaces(self):
        sh("ip", "netns", "add", self.bridge)
        self.made_ns.append(self.bridge)
        br = ["ip", "-n", self.bridge]
        sh(*br, "link", "add", "br0", "type", "bridge")
        sh(*br, "link", "set", "br0", "up")
        for h in self.hosts + [self.outsider]:
            sh("ip", "netns", "add", h.ns)
            self.made_ns.append(h.ns)
            veth = f"v{h.name}"[:15]
            sh(*br, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            sh(*br, "link", "set", veth, "master", "br0", "up")
            h.exec("ip", "link", "set", "lo", "up")
            h.exec("ip", "addr", "add", f"{h.addr}/24", "dev", "eth0")
            h.exec("ip", "link", "set", "eth0", "up")
        self.write_hosts_files()

    def hosts_text(self):
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.addr} {h.name}" for h in self.hosts + [self.outsider]]
        return "\n".join(lines) + "\n"

    def write_hosts_files(self):
        text = self.hosts_text()
        for h in self.hosts + [self.outsider]:
            d = Path("/etc/netns") / h.ns
            d.mkdir(parents=True, exist_ok=True)
            # Rewritten in place: `ip netns exec` bind-mounts this very file,
            # so running processes see a change at their next lookup.
            with open(d / "hosts", "w") as f:
                f.write(text)
            # Names outside the hosts file fail at once, inside the namespace.
            (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")

    def configs(self):
        self.bin = self.dir / "bin" / "cachecast"
        self.bin.parent.mkdir()
        shutil.copy2(self.args.bin, self.bin)
        os.chmod(self.bin, 0o755)
        secret = os.urandom(24).hex()
        for h in self.hosts:
            h.peers = [p for p in self.hosts if p is not h]
            (h.dir / "state").mkdir(parents=True)
            os.chown(h.dir / "state", NOBODY, NOBODY)
            sec = h.dir / "cluster.secret"
            sec.write_text(secret + "\n")
            os.chmod(sec, 0o600)
            os.chown(sec, NOBODY, NOBODY)
            lines = [f"# {h.name}: written as an operator would, default ports"]
            if h.name == "app2":
                # The 2.29-2.40 form, one member with its port and one without.
                members = [f"{p.name}:{PORT}" if i % 2 == 0 else p.name for i, p in enumerate(h.peers)]
                lines += [f"cluster.hostname = {h.name}", f"cluster.members = {', '.join(members)}"]
            else:
                lines.append(f"cluster.instance0.hostname = {h.name}")
                lines += [f"cluster.instance{i}.hostname = {p.name}" for i, p in enumerate(h.peers, 1)]
            lines += [
                f"cachecast.secret.file = {sec}",
                f"cachecast.state.file = {h.dir / 'state' / 'node.state'}",
                "",
            ]
            (h.dir / "dhis.conf").write_text("\n".join(lines))
            os.chmod(h.dir, 0o755)
            os.chmod(h.dir / "dhis.conf", 0o644)

    def firewall(self, h, doc_lines, example_peers):
        """A hardened host: input policy drop, then the doc's rules."""
        h.exec("nft", "flush", "ruleset")
        h.nft("add", "table", "inet", "filter")
        h.nft("add", "chain", "inet", "filter", "input", "{ type filter hook input priority 0 ; policy drop ; }")
        for cmd in firewall_for(doc_lines, example_peers, [p.addr for p in h.peers]):
            h.exec("sh", "-ec", cmd)
        # Faults go in a table of their own, evaluated first.
        h.nft("add", "table", "inet", "fault")
        h.nft("add", "chain", "inet", "fault", "in", "{ type filter hook input priority -10 ; }")
        h.nft("add", "chain", "inet", "fault", "out", "{ type filter hook output priority -10 ; }")

    def env(self, h):
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DHIS2_HOME": str(h.dir), "RUST_LOG": "info"}

    def start_sidecar(self, h):
        out = open(h.dir / "sidecar.log", "a")
        cmd = ["ip", "netns", "exec", h.ns, "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
               "--clear-groups", str(self.bin), "run"]
        h.sidecar = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(h))
        self.procs.append(h.sidecar)

    def start_app(self, h):
        cmd = ["ip", "netns", "exec", h.ns, sys.executable, str(HERE / "app.py"), "--name", h.name,
               "--rate", str(self.args.rate), "--log", str(h.dir / "app.jsonl"),
               "--stop-file", str(h.dir / "stop-sending"), "--go-file", str(self.dir / "go")]
        h.app = subprocess.Popen(cmd, stdout=open(h.dir / "app.out", "w"), stderr=subprocess.STDOUT)
        self.procs.append(h.app)

    def cli(self, h, *args, check=True):
        return h.exec("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                      str(self.bin), *args, check=check, env=self.env(h))

    def status(self, h):
        r = self.cli(h, "status", "--json", check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def all_connected(self):
        for h in self.hosts:
            st = self.status(h)
            if st is None or len(st["peers"]) != len(h.peers):
                return False
            if not all(p["outbound"] and p["inbound"] for p in st["peers"]):
                return False
        return True

    def wait(self, what, limit, cond, step=0.2):
        start = time.monotonic()
        while time.monotonic() - start < limit:
            if cond():
                return time.monotonic() - start
            time.sleep(step)
        raise CheckFailed(f"{what}: not within {limit}s")

    def sample_rss(self):
        for h in self.hosts:
            if h.sidecar is None or h.sidecar.poll() is not None:
                continue
            try:
                for line in Path(f"/proc/{h.sidecar.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        h.peak_rss_kib = max(h.peak_rss_kib, int(line.split()[1]))
            except OSError:
                pass

    # ---- tearing down
    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        for ns in reversed(self.made_ns):
            kill_ns(ns)
        if self.made_etc_netns:
            try:
                Path("/etc/netns").rmdir()
            except OSError:
                pass  # not empty: another run's, or the machine's own
        if self.args.keep:
            log(f"files kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def kill_ns(ns):
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def leftovers():
    """Namespaces of earlier runs that were killed before their clean-up."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(rf"{PREFIX}(\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            log(f"removing namespace {name} left by an interrupted run")
            kill_ns(name)


# ---------------------------------------------------------------- probes

PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("open")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(type(e).__name__)
"""


def probe(h, addr, port, limit=1.5):
    return h.exec(sys.executable, "-c", PROBE, addr, str(port), str(limit), timeout=limit + 10).stdout.strip()


# ---------------------------------------------------------------- faults

class Fault:
    def __init__(self, name, pairs, expect_down=True, expect_flush=False):
        self.name, self.pairs = name, pairs
        self.expect_down, self.expect_flush = expect_down, expect_flush
        self.start = self.end = None
        # Until the next fault begins: what happens in between is its doing.
        self.until = None
        self.detect = None
        self.reconnect = None
        self.spread = None


def heal(c, *hosts):
    for h in hosts:
        h.nft("flush", "table", "inet", "fault")


def run_faults(c):
    h1, h2, h3 = c.hosts[:3]
    quiet = c.args.quiet

    def record(f, begin, hold, end):
        log(f"fault: {f.name}")
        f.start = time.monotonic()
        if c.faults:
            c.faults[-1].until = f.start
        begin()
        time.sleep(hold)
        f.end = time.monotonic()
        end()
        c.faults.append(f)
        if f.expect_down:
            c.wait(f"{f.name}: a link of each pair seen down", 30, lambda: went_down(c, f), step=0.3)
        c.wait(f"{f.name}: every link back", 30, c.all_connected, step=0.2)
        c.sample_rss()
        time.sleep(quiet)

    # 1. Silent drop both ways: packets vanish, no RST, no FIN.
    def silent():
        for a, b in ((h1, h2), (h2, h1)):
            a.nft("add", "rule", "inet", "fault", "in", "ip", "saddr", b.addr, "drop")
            a.nft("add", "rule", "inet", "fault", "out", "ip", "daddr", b.addr, "drop")
    record(Fault("silent drop app1<->app2 (12s)", [(h1, h2)]), silent, 12, lambda: heal(c, h1, h2))

    # 2. The link itself goes down.
    record(Fault("link down app2 (8s)", [(h2, h1), (h2, h3)]),
           lambda: h2.exec("ip", "link", "set", "eth0", "down"), 8,
           lambda: h2.exec("ip", "link", "set", "eth0", "up"))

    # 3. One way only: app1's packets to app3 vanish, app3's reach app1.
    record(Fault("one-way drop app1->app3 (12s)", [(h1, h3)]),
           lambda: h1.nft("add", "rule", "inet", "fault", "out", "ip", "daddr", h3.addr, "drop"), 12,
           lambda: heal(c, h1))

    # 4. A slow, lossy path.
    def impair():
        for a, b in ((h2, h3), (h3, h2)):
            a.nft("add", "rule", "inet", "fault", "out", "ip", "daddr", b.addr,
                  "numgen", "random", "mod", "100", "<", str(c.args.loss), "drop")
        if c.netem:
            for a in (h2, h3):
                a.exec("tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "20ms", "10ms",
                       "reorder", "10%", "rate", "2mbit")
        else:
            for a in (h2, h3):
                a.exec("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "2mbit",
                       "burst", "16kb", "latency", "200ms")

    def unimpair():
        heal(c, h2, h3)
        for a in (h2, h3):
            a.exec("tc", "qdisc", "del", "dev", "eth0", "root", check=False)
    # Links may stay up through it: nothing to detect, but nothing lost.
    record(Fault(f"impaired app2<->app3, {c.args.loss}% loss (20s)", [(h2, h3)], expect_down=False),
           impair, 20, unimpair)

    # 5. The sidecar stops answering but its sockets stay open.
    record(Fault("SIGSTOP app3's sidecar (30s)", [(h3, h1), (h3, h2)]),
           lambda: (c.sample_rss(), h3.sidecar.send_signal(signal.SIGSTOP)), 30,
           lambda: h3.sidecar.send_signal(signal.SIGCONT))

    # 6. A crash: killed, restarted on the same config and state file.
    def kill():
        c.sample_rss()
        h2.sidecar.kill()
        h2.sidecar.wait(timeout=10)
    record(Fault("SIGKILL app2's sidecar, restart after 2s", [(h2, h1), (h2, h3)], expect_flush=True),
           kill, 2, lambda: c.start_sidecar(h2))

    # 7. A host's address changes under its name. The operator updates the
    # name and the peers' firewalls (the doc's rules with the new address).
    old = h3.addr
    new = f"{SUBNET}.{40 + h3.idx}" if old.endswith(f".{10 + h3.idx}") else f"{SUBNET}.{10 + h3.idx}"

    def move():
        h3.addr = new
        c.write_hosts_files()
        for p in (h1, h2) + tuple(c.hosts[3:]):
            p.exec("nft", "delete", "table", "inet", "filter")
            p.nft("add", "table", "inet", "filter")
            p.nft("add", "chain", "inet", "filter", "input",
                  "{ type filter hook input priority 0 ; policy drop ; }")
            for cmd in firewall_for(c.doc_lines, c.example_peers, [q.addr for q in p.peers]):
                p.exec("sh", "-ec", cmd)
        # The old address goes first: deleting a subnet's primary address
        # takes its secondaries with it.
        h3.exec("sh", "-ec", f"ip addr del {old}/24 dev eth0; ip addr add {new}/24 dev eth0")
    record(Fault(f"address of app3 {old} -> {new}", [(h3, h1), (h3, h2)]), move, 0, lambda: None)


def is_down(r):
    """A record of the application's that shows a link to a peer down: a
    peer-down event, or link flags not both up."""
    if r["t"] == "link":
        return not (r["out"] and r["inb"])
    return r["t"] == "ev" and r["ev"].get("type") == "peer-down"


def about(line, node):
    return node in line and ('"t":"link"' in line or '"peer-down"' in line or '"peer-up"' in line)


def went_down(c, f):
    """Whether, for each pair the fault cuts, one side's application has
    seen that link down since the fault began."""
    for a, b in f.pairs:
        seen = False
        for x, y in ((a, b), (b, a)):
            path = x.dir / "app.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                if not about(line, y.node):
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r["at"] >= f.start and is_down(r):
                    seen = True
                    break
            if seen:
                break
        if not seen:
            return False
    return True


# ---------------------------------------------------------------- the check

def load(h):
    recs = []
    path = h.dir / "app.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by the final kill
    return recs


def name_of(ev):
    if ev.get("cache") == "soak.key" and ev.get("key"):
        origin, n = ev["key"].split(":")
        return origin, int(n)
    m = re.match(r"soak\.whole\.(\w+)\.(\d+)$", ev.get("cache", ""))
    if m and ev.get("key") is None:
        return m.group(1), int(m.group(2))
    return None


def flush_marks(evs):
    """Each flush a receiving application got: its time, and for each
    origin the number of the first invalidation from it that followed."""
    marks = []
    for r in evs:
        ev = r["ev"]
        if ev.get("type") == "flush":
            marks.append((r["at"], ev.get("reason"), {}))
        elif ev.get("type") == "invalidate":
            nm = name_of(ev)
            if nm is not None:
                for _, _, nxt in marks:
                    nxt.setdefault(nm[0], nm[1])
    return marks


def covered(marks, origin, n, sent, acc_at):
    """Whether a flush covers invalidation `n` of `origin`, sent at `sent`
    and answered (202) at `acc_at`. The origin accepted it in between, so a
    flush after the answer covers it, one before the request does not, and
    one in between does when the origin's stream after the flush goes on
    past `n`: each origin's invalidations arrive in the order they were
    accepted (one request at a time), so `n` was in the receiving sidecar
    before the flush was made, and accepted before it."""
    return any(
        ft > acc_at or (ft > sent and origin in nxt and n < nxt[origin])
        for ft, _, nxt in marks
    )


def analyse(c):
    logs = {h.name: load(h) for h in c.hosts}
    accepted = {}
    acc_sent = {}
    unknown = {}
    for h in c.hosts:
        accepted[h.name] = {r["n"]: r["at"] for r in logs[h.name] if r["t"] == "acc"}
        acc_sent[h.name] = {r["n"]: r["sent"] for r in logs[h.name] if r["t"] == "acc"}
        unknown[h.name] = {r["n"] for r in logs[h.name] if r["t"] == "unk"}
    pairs = []
    for b in c.hosts:
        evs = [r for r in logs[b.name] if r["t"] == "ev"]
        flushes = [(r["at"], r["ev"].get("reason")) for r in evs if r["ev"].get("type") == "flush"]
        marks = flush_marks(evs)
        got = {}
        for r in evs:
            if r["ev"].get("type") != "invalidate":
                continue
            nm = name_of(r["ev"])
            if nm is None:
                continue
            got.setdefault(nm[0], []).append((nm[1], r["at"]))
        for a in c.hosts:
            if a is b:
                continue
            seen = {}
            dups = ooo = 0
            top = 0
            for n, at in got.get(a.name, []):
                if n in seen:
                    dups += 1
                    continue
                seen[n] = at
                if n in accepted[a.name]:
                    if n < top:
                        ooo += 1
                    top = max(top, n)
            delivered = late = lost = covered_n = 0
            lost_first = None
            for n, acc_at in accepted[a.name].items():
                if n in seen:
                    delivered += 1
                    if seen[n] - acc_at > 1.0:
                        late += 1
                elif covered(marks, a.name, n, acc_sent[a.name][n], acc_at):
                    covered_n += 1
                else:
                    lost += 1
                    lost_first = n if lost_first is None else min(lost_first, n)
            lost_detail = None
            if lost_first is not None:
                # What a reader needs to judge it: when the request went
                # out and was answered, and what the receiver saw around it.
                acc = next(r for r in logs[a.name] if r["t"] == "acc" and r["n"] == lost_first)
                t0, t1 = acc["sent"] - 5, acc["at"] + 5
                near = [
                    f"{r['at'] - acc['sent']:+.3f}s {r['t']}"
                    + (f" {r['ev'].get('reason')}" if r["t"] == "ev" else "")
                    for r in logs[b.name]
                    if t0 <= r["at"] <= t1
                    and (r["t"] in ("sse-open", "sse-closed", "sse-error")
                         or (r["t"] == "ev" and r["ev"].get("type") == "flush"))
                ]
                lost_detail = (
                    f"sent, answered {acc['at'] - acc['sent']:.3f}s later (seqs {acc.get('seqs')}); "
                    f"at {b.name}, relative to the send: {', '.join(near) or 'nothing'}"
                )
            strays = sum(1 for n in seen if n not in accepted[a.name] and n not in unknown[a.name])
            pairs.append({
                "pair": f"{a.name}->{b.name}", "sent": len(accepted[a.name]), "delivered": delivered,
                "late": late, "covered": covered_n, "lost": lost, "lost_first": lost_first,
                "lost_detail": lost_detail,
                "dups": dups, "ooo": ooo, "strays": strays,
                "unknown_delivered": sum(1 for n in seen if n in unknown[a.name]),
                "unknown": len(unknown[a.name]),
            })
        b_flush = {}
        for _, reason in flushes:
            b_flush[reason] = b_flush.get(reason, 0) + 1
        b.flushes = flushes
        b.flush_marks = marks
        b.flush_reasons = b_flush
    return logs, pairs


def link_times(c, logs):
    """Detection and reconnect time of each fault, from the peer events
    each application received and the link flags its status poller saw
    (every 100 ms: a link down and up again within that shows in the
    events only)."""
    for f in c.faults:
        downs, ups, firsts = [], [], []
        for a, b in f.pairs:
            views = [(a, b), (b, a)]
            for x, y in views:
                flags = [r for r in logs[x.name]
                         if r["t"] == "link" and r["peer"] == y.node and f.start <= r["at"] < f.until]
                events = [r for r in logs[x.name] if r["t"] == "ev" and r["ev"].get("peer") == y.node
                          and f.start <= r["at"] < f.until]
                d = min((r["at"] for r in flags + events if is_down(r)), default=None)
                if d is not None and d <= f.end + 5:
                    downs.append(d - f.start)
                after = [r for r in flags if r["at"] >= f.end]
                up_event = next((r["at"] for r in events
                                 if r["at"] >= f.end and r["ev"].get("type") == "peer-up"), None)
                up_out = next((r["at"] for r in after if r["out"]), None)
                up_in = next((r["at"] for r in after if r["inb"]), None)
                # Both ways up, or (too quick for the poller) the peer back.
                up_all = next((r["at"] for r in after if r["out"] and r["inb"]), up_event)
                if up_all is not None:
                    ups.append(up_all - f.end)
                firsts += [t - f.end for t in (up_out, up_in, up_event) if t is not None]
        f.detect = min(downs) if downs else None
        f.reconnect = max(ups) if ups else None
        f.spread = (max(ups) - min(firsts)) if ups and firsts else None


def fault_windows(c, logs):
    """Per fault: what every host accepted while it lasted, and how that
    fared at every other host; and the flushes from its start until the
    next fault's."""
    got = {b.name: {name_of(r["ev"]) for r in logs[b.name]
                    if r["t"] == "ev" and r["ev"].get("type") == "invalidate"} for b in c.hosts}
    rows = []
    for f in c.faults:
        sent = dl = cov = lost = 0
        for a in c.hosts:
            acc = {r["n"]: (r["at"], r["sent"]) for r in logs[a.name]
                   if r["t"] == "acc" and f.start <= r["at"] <= f.end}
            for b in c.hosts:
                if b is a:
                    continue
                for n, (at, sent_at) in acc.items():
                    sent += 1
                    if (a.name, n) in got[b.name]:
                        dl += 1
                    elif covered(b.flush_marks, a.name, n, sent_at, at):
                        cov += 1
                    else:
                        lost += 1
        flushes = sum(1 for b in c.hosts for ft, _ in b.flushes if f.start <= ft < f.until)
        rows.append((f, sent, dl, cov, lost, flushes))
    return rows


def report(c, pairs, rows, statuses):
    print()
    print("== pairs: every invalidation the origin accepted, as the receiving application saw it")
    hdr = f"{'pair':<14}{'sent':>8}{'delivered':>11}{'late':>7}{'flushed':>9}{'lost':>6}{'dups':>6}{'ooo':>5}"
    print(hdr)
    tot = {k: 0 for k in ("sent", "delivered", "late", "covered", "lost", "dups", "ooo")}
    for p in pairs:
        print(f"{p['pair']:<14}{p['sent']:>8}{p['delivered']:>11}{p['late']:>7}{p['covered']:>9}"
              f"{p['lost']:>6}{p['dups']:>6}{p['ooo']:>5}")
        for k in tot:
            tot[k] += p[k]
    print(f"{'all':<14}{tot['sent']:>8}{tot['delivered']:>11}{tot['late']:>7}{tot['covered']:>9}"
          f"{tot['lost']:>6}{tot['dups']:>6}{tot['ooo']:>5}")
    print("  late: delivered over 1s after the origin accepted it (replayed after a fault);")
    print("  flushed: not delivered, but a flush reached the receiver after it was accepted")
    unk = sum(p["unknown"] for p in pairs)
    print(f"  requests whose answer never came (1s client timeout, sidecar stopped): {unk // max(1, len(c.hosts) - 1)};"
          f" delivered anyway at a peer: {sum(p['unknown_delivered'] for p in pairs)} times")
    print()
    print("== faults")
    print(f"{'fault':<44}{'detect':>8}{'reconn':>8}{'spread':>8}{'sent':>7}{'deliv':>7}{'flushd':>7}{'lost':>6}{'flushes':>8}")
    fmt = lambda v: "-" if v is None else f"{v:.2f}s"
    for f, sent, dl, cov, lost, fl in rows:
        print(f"{f.name:<44}{fmt(f.detect):>8}{fmt(f.reconnect):>8}{fmt(f.spread):>8}{sent:>7}{dl:>7}{cov:>7}{lost:>6}{fl:>8}")
    print("  detect: fault start to the first link seen down; reconn: fault end until every link of")
    print("  the pairs it cut is up both ways; spread: first direction up to both up; sent: accepted")
    print("  by any host while the fault lasted, once per receiver; flushes: received by any")
    print("  application from the fault's start to the next fault's")
    print()
    print("== hosts")
    print(f"{'host':<10}{'peak RSS':>10}{'replayed':>10}{'reconn':>8}{'proto err':>11}{'refused':>9}"
          f"  flushes received (reason)")
    for h in c.hosts:
        cnt = (statuses.get(h.name) or {}).get("counters", {})
        refused = "/".join(str(cnt.get(f"rejected_{k}", "-")) for k in ("not_allowed", "handshake", "auth", "tls"))
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(h.flush_reasons.items())) or "none"
        print(f"{h.name:<10}{h.peak_rss_kib / 1024:>8.1f}Mi{cnt.get('replayed', '-'):>10}"
              f"{cnt.get('reconnects', '-'):>8}{cnt.get('protocol_errors', '-'):>11}{refused:>9}  {reasons}")
    print("  counters since the sidecar's last start; refused: not allowed/handshake/auth/tls;")
    print("  peak RSS: the largest VmHWM of the host's sidecar processes")
    print()


# ---------------------------------------------------------------- main

def preflight(args):
    """Why this machine cannot run the suite, or None."""
    if os.geteuid() != 0:
        return "not root: network namespaces and nftables need root"
    for tool in ("ip", "nft", "tc", "setpriv"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (iproute2, nftables, util-linux)"
    if not Path(args.bin).exists():
        return f"{args.bin} not found: build it first (cargo build --features cli)"
    probe_ns = f"{PREFIX}{os.getpid()}probe"
    r = subprocess.run(["ip", "netns", "add", probe_ns], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot make a network namespace: {r.stderr.strip()}"
    r = subprocess.run(["ip", "netns", "exec", probe_ns, "nft", "add", "table", "inet", "t"],
                       capture_output=True, text=True)
    kill_ns(probe_ns)
    if r.returncode != 0:
        return f"nftables does not work in a namespace: {r.stderr.strip()}"
    return None


def has_netem(c):
    h = c.hosts[0]
    r = h.exec("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
    if r.returncode == 0:
        h.exec("tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return True
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=3, choices=[3, 4, 5])
    ap.add_argument("--passes", type=int, default=1, help="rounds of the fault schedule (a longer soak)")
    ap.add_argument("--rate", type=float, default=200, help="invalidations per second per host")
    ap.add_argument("--loss", type=int, default=10, help="percent of packets lost on the impaired path")
    ap.add_argument("--quiet", type=float, default=3, help="seconds of plain traffic after each fault")
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "cachecast"))
    ap.add_argument("--keep", action="store_true", help="keep the run's files (logs, configs)")
    ap.add_argument("--skip-unavailable", action="store_true",
                    help="exit 0 (saying why) where namespaces cannot be made")
    args = ap.parse_args()

    why = preflight(args)
    if why:
        print(f"netns suite cannot run here: {why}", flush=True)
        return 0 if args.skip_unavailable else 1

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, interrupted)

    leftovers()
    c = Cluster(args)
    ok = False
    try:
        c.namespaces()
        c.netem = has_netem(c)
        if not c.netem:
            print("note: this kernel has no sch_netem (tc netem): the impaired path loses packets at random "
                  "(nft numgen) and is rate-limited (tc tbf); it adds no delay jitter or reordering", flush=True)
        doc = (ROOT / "docs" / "operations.md").read_text()
        example_self, c.example_peers, c.doc_lines = doc_firewall(doc)
        log(f"firewall from docs/operations.md (written for {example_self}, peers {', '.join(c.example_peers)}):")
        for line in c.doc_lines:
            print(f"    {line}")
        c.configs()
        for h in c.hosts:
            c.firewall(h, c.doc_lines, c.example_peers)
        for h in c.hosts:
            r = c.cli(h, "check", check=False)
            if r.returncode != 0:
                raise CheckFailed(f"cachecast check on {h.name} exited {r.returncode}:\n{r.stdout}{r.stderr}")
            c.start_sidecar(h)
        took = c.wait("the mesh through the doc's firewall", 30, c.all_connected)
        log(f"mesh up through the firewall in {took:.2f}s: {len(c.hosts)} hosts, every link both ways")
        checks(c)
        for h in c.hosts:
            c.start_app(h)
        c.wait("every application's event stream open", 20,
               lambda: all('"t":"sse-open"' in (h.dir / "app.jsonl").read_text()
                           for h in c.hosts if (h.dir / "app.jsonl").exists())
               and all((h.dir / "app.jsonl").exists() for h in c.hosts))
        (c.dir / "go").touch()
        time.sleep(args.quiet)
        for i in range(args.passes):
            if args.passes > 1:
                log(f"pass {i + 1} of {args.passes}")
            run_faults(c)
        c.faults[-1].until = time.monotonic() + 3600
        for h in c.hosts:
            (h.dir / "stop-sending").touch()
        c.sample_rss()
        # Everything accepted is delivered or covered once the links are idle.
        drained = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, pairs = analyse(c)
            if all(p["lost"] == 0 for p in pairs):
                drained = pairs
                break
            time.sleep(0.5)
        statuses = {h.name: c.status(h) for h in c.hosts}
        for h in c.hosts:
            h.app.send_signal(signal.SIGTERM)
            h.app.wait(timeout=10)
        logs, pairs = analyse(c)
        link_times(c, logs)
        rows = fault_windows(c, logs)
        report(c, pairs, rows, statuses)
        verdict(c, pairs, rows, statuses, drained is not None)
        ok = True
        log("all checks held")
    except CheckFailed as e:
        print(f"\nFAILED: {e}", flush=True)
        tails(c)
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e}): cleaning up", flush=True)
    finally:
        c.cleanup()
    return 0 if ok else 1


def checks(c):
    """What the doc's firewall must let through, and what it must not."""
    h1, h2 = c.hosts[0], c.hosts[1]
    for h in c.hosts:
        r = c.cli(h, "status", check=False)
        if r.returncode != 0:
            raise CheckFailed(f"`cachecast status` on {h.name} exited {r.returncode} behind the firewall: {r.stderr}")
    log("`cachecast status` answers on every host (loopback passes the firewall)")
    # A listener on every address of app1, on a port the doc does not open.
    lst = subprocess.Popen(["ip", "netns", "exec", h1.ns, sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                            "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c.procs.append(lst)
    c.wait("a test listener on app1:8080", 10, lambda: probe(h1, "127.0.0.1", 8080) == "open")
    results = {
        "app2 -> app1:4001 (peer port, from a peer)": (probe(h2, h1.addr, PORT), "open"),
        "app2 -> app1:4002 (API)": (probe(h2, h1.addr, 4002), "timeout"),
        "app2 -> app1:8080 (another listening port)": (probe(h2, h1.addr, 8080), "timeout"),
        "outsider -> app1:4001 (not a peer)": (probe(c.outsider, h1.addr, PORT), "timeout"),
        "app1 -> 127.0.0.1:8080 (loopback)": (probe(h1, "127.0.0.1", 8080), "open"),
    }
    lst.kill()
    for what, (got, want) in results.items():
        log(f"  {what}: {got}")
        if got != want:
            raise CheckFailed(f"{what}: {got}, expected {want}")
    # The outsider was stopped by the firewall, not by the node: app1 saw
    # no connection it had to refuse (app2's probe came from a peer address
    # and was closed before its hello, which the node counts otherwise).
    st = c.status(h1) or {}
    refused = st.get("counters", {}).get("rejected_not_allowed")
    log(f"  app1's own refusals of non-peer addresses: {refused}")
    if refused != 0:
        raise CheckFailed(f"app1 refused {refused} connections itself: the firewall let a non-peer through")


def verdict(c, pairs, rows, statuses, drained):
    problems = []
    for p in pairs:
        if p["lost"]:
            problems.append(f"{p['pair']}: {p['lost']} lost (first n={p['lost_first']}: {p['lost_detail']})")
        if p["ooo"]:
            problems.append(f"{p['pair']}: {p['ooo']} out of order")
        if p["strays"]:
            problems.append(f"{p['pair']}: {p['strays']} delivered that were never sent")
        if p["sent"] == 0 or p["delivered"] == 0:
            problems.append(f"{p['pair']}: nothing sent or delivered")
    for f, sent, dl, cov, lost, fl in rows:
        if f.detect is None and f.expect_down:
            problems.append(f"{f.name}: no link was seen going down")
        if f.reconnect is None and f.expect_down:
            problems.append(f"{f.name}: the links were not seen coming back")
        elif f.reconnect is not None and f.reconnect > 12:
            problems.append(f"{f.name}: links back only {f.reconnect:.1f}s after the fault ended")
        if lost:
            problems.append(f"{f.name}: {lost} accepted during the fault were lost")
        if not f.expect_flush and fl:
            problems.append(f"{f.name}: {fl} flushes, where a replay should have covered it")
        if f.expect_flush and not fl:
            problems.append(f"{f.name}: no flush after a crash")
        if f.name.startswith("silent drop") and f.spread is not None and f.spread > 1.0:
            problems.append(f"{f.name}: the second direction came back {f.spread:.2f}s after the first")
    for h in c.hosts:
        cnt = (statuses.get(h.name) or {}).get("counters")
        if cnt is None:
            problems.append(f"{h.name}: no final status")
        else:
            # Every peer holds the secret and dials from its own address: a
            # reset is no protocol error, a dial given up is no auth failure.
            for k in ("protocol_errors", "rejected_auth", "rejected_not_allowed", "rejected_tls"):
                if cnt.get(k):
                    problems.append(f"{h.name}: {k} = {cnt[k]}, though no peer did anything wrong")
    if not drained:
        problems.append("the invalidations did not drain within 30s after sending stopped")
    if problems:
        raise CheckFailed("\n  " + "\n  ".join(problems))


def tails(c):
    for h in c.hosts:
        p = h.dir / "sidecar.log"
        if p.exists():
            lines = p.read_text(errors="replace").splitlines()[-25:]
            print(f"--- {h.name} sidecar.log (last {len(lines)} lines)")
            print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
