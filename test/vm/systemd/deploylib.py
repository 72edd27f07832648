# Helpers of the deployment tests (test/vm/systemd): the packages from build/deb, systemctl and
# unit properties, the journal, apt-get offline, the agent's gRPC socket. The fixtures and hooks
# are in deploy_plugin.py.

import contextlib
import functools
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.environ.get("EMBER_SRCDIR", os.path.abspath(os.path.join(HERE, "..", "..", "..")))
BUILD = os.environ.get("EMBER_BUILD", os.path.join(SRCDIR, "build"))
DEBDIR = os.environ.get("EMBER_DEBDIR", os.path.join(BUILD, "deb"))
sys.path.insert(0, os.path.join(BUILD, "py"))

UNIT = "emberd.service"
SOCKET = "/run/ember/ember.sock"
CONFIG = "/etc/ember/ember.conf"
STATE_DIR = "/var/lib/ember"
# What the tests install, in build/deb as <name>_<version>_<arch>.deb.
PACKAGES = ("ember", "ember-fcsim", "ember-guest")


def under_systemd():
    """True inside test/vm/run --systemd: a VM (EMBER_IN_VM) whose PID 1 is systemd."""
    try:
        with open("/proc/1/comm") as f:
            pid1 = f.read().strip()
    except OSError:
        pid1 = ""
    return (os.environ.get("EMBER_IN_VM") == "1" and pid1 == "systemd"
            and os.path.isdir("/run/systemd/system"))


def run(*args, check=True, timeout=300, env=None, **kw):
    """Runs args, output captured as text; check=True raises with the output on failure. A
    command that outlives timeout is killed and reported with what the VM was doing then:
    nobody can log in to the VM to look, and the runner's own timeout would show nothing."""
    try:
        r = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                           timeout=timeout, env=env, **kw)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(map(str, args))} did not finish in {timeout:.0f}s; "
                             f"its output so far:\n{_text(e.stdout)}{_text(e.stderr)}\n"
                             f"{snapshot()}") from None
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n"
                             f"{r.stdout}{r.stderr}")
    return r


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def snapshot():
    """The processes (with the kernel function each one sleeps in) and the journal's last
    lines: what a hung test reports."""
    out = []
    for title, cmd in (("processes", ["ps", "-eo", "pid,ppid,stat,wchan:24,etimes,args",
                                      "--forest"]),
                       ("journal (last 80 lines)", ["journalctl", "--no-pager", "-b", "-n", "80",
                                                    "-o", "short-monotonic"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            text = r.stdout + r.stderr
        except (OSError, subprocess.SubprocessError) as e:
            text = f"({e})"
        out.append(f"--- {title} ---\n{text}")
    return "\n".join(out)


def wait_for(pred, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def runs_last(test):
    """Decorates a test that removes or purges the packages: it runs after all the others
    (deploy_plugin.py orders them), so that those need not install the packages again."""
    test.ember_runs_last = True
    return test


# --- systemd ----------------------------------------------------------------------------------

def systemctl(*args, check=False, timeout=330):
    """systemctl ARGS; not checked by default: the status is often what a test looks at.
    The timeout is above emberd.service's TimeoutStartSec (300)."""
    return run("systemctl", "--no-pager", *args, check=check, timeout=timeout)


def unit_props(unit, *names):
    """{name: value} from `systemctl show` (values as strings)."""
    args = []
    for n in names:
        args += ["-p", n]
    out = systemctl("show", *args, unit, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def unit_prop(unit, name):
    return unit_props(unit, name).get(name)


def is_active(unit=UNIT):
    return systemctl("is-active", unit).stdout.strip()


def main_pid(unit=UNIT):
    return int(unit_prop(unit, "MainPID") or 0)


def unit_cgroup(pid):
    """The cgroup v2 path of a process ("/system.slice/emberd.service")."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


# --- the journal ------------------------------------------------------------------------------

class Journal:
    """The journal from the moment this object was made on: entries(), messages() and text()
    take journalctl matches ("SANDBOX_ID=...", "_PID=...") and unit=, priority=."""

    def __init__(self):
        self.cursor = self._last_cursor()

    @staticmethod
    def _last_cursor():
        out = run("journalctl", "--no-pager", "-n", "1", "-o", "json", check=False).stdout
        for line in out.splitlines():
            try:
                return json.loads(line).get("__CURSOR")
            except ValueError:
                pass
        return None

    def entries(self, *matches, unit=None, priority=None):
        """A list of dicts, the journal's fields (MESSAGE as text)."""
        run("journalctl", "--sync", check=False)  # what was logged so far is readable
        args = ["journalctl", "--no-pager", "-o", "json"]
        args += [f"--after-cursor={self.cursor}"] if self.cursor else ["-b"]
        if unit:
            args += ["-u", unit]
        if priority is not None:
            args += ["-p", str(priority)]
        out = run(*args, *matches, check=False).stdout
        entries = []
        for line in out.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            msg = e.get("MESSAGE")
            if isinstance(msg, list):  # binary-safe form: a list of bytes
                e["MESSAGE"] = bytes(msg).decode(errors="replace")
            entries.append(e)
        return entries

    def messages(self, *matches, **kw):
        return [e.get("MESSAGE", "") for e in self.entries(*matches, **kw)]

    def text(self, *matches, **kw):
        return "\n".join(self.messages(*matches, **kw))


def unit_log_tail(unit=UNIT, lines=60):
    """The last lines this boot logged for unit, for failure reports."""
    return run("journalctl", "--no-pager", "-b", "-u", unit, "-n", str(lines), "-o",
               "short-monotonic", check=False).stdout


# --- packages ---------------------------------------------------------------------------------

def _version_cmp(a, b):
    if a == b:
        return 0
    return -1 if run("dpkg", "--compare-versions", a, "lt", b, check=False).returncode == 0 else 1


def find_debs():
    """{package: path of its newest .deb in DEBDIR}, for the packages found; ember's own is the
    one that decides whether the tests can run."""
    found = {}
    for name in PACKAGES:
        paths = glob.glob(os.path.join(DEBDIR, f"{name}_*.deb"))
        versions = {p: os.path.basename(p).split("_")[1] for p in paths}
        if versions:
            newest = max(paths, key=functools.cmp_to_key(
                lambda a, b: _version_cmp(versions[a], versions[b])))
            found[name] = newest
    return found


def deb_version(path):
    return run("dpkg-deb", "-f", path, "Version").stdout.strip()


def package_state(name):
    """(dpkg's abbreviated status, version): ("ii", "0.1.0") installed, ("rc", ...) removed with
    its configuration left, ("un", "") unknown."""
    r = run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Version}", name, check=False)
    if r.returncode != 0 or "|" not in r.stdout:
        return ("un", "")
    status, version = r.stdout.split("|", 1)
    return (status.strip(), version.strip())


@functools.lru_cache(maxsize=None)
def _offline_dirs():
    d = tempfile.mkdtemp(prefix="apt-offline-")
    os.makedirs(os.path.join(d, "lists", "partial"))
    os.makedirs(os.path.join(d, "sources.list.d"))
    return d


def apt_get(*args, timeout=300):
    """apt-get, offline: no sources and no package lists, so it knows only what is installed
    and the .debs named on its command line. A dependency that is not installed then fails at
    once ("... but it is not installable") instead of trying the network the VM does not have;
    it is quicker too (no lists to read over 9p). Non-interactive, existing conffiles kept."""
    d = _offline_dirs()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return run("apt-get", "-y", "-q",
               "-o", "Dir::Etc::SourceList=/dev/null",
               "-o", f"Dir::Etc::SourceParts={d}/sources.list.d",
               "-o", f"Dir::State::Lists={d}/lists",
               "-o", "Dpkg::Options::=--force-confdef",
               "-o", "Dpkg::Options::=--force-confold",
               *args, env=env, timeout=timeout)


def install(debs):
    """apt-get install ./<deb>... (the paths as given, made relative to a ./ form apt takes
    as files)."""
    paths = [p if p.startswith(("/", "./")) else "./" + p for p in debs]
    return apt_get("install", *paths)


def ensure_installed(debs):
    """Installs the packages of debs ({name: path}) unless exactly those versions are
    installed already (a test before may have removed them)."""
    missing = [p for name, p in sorted(debs.items())
               if package_state(name) != ("ii", deb_version(p))]
    if missing:
        install(list(debs.values()))
    for name, p in debs.items():
        assert package_state(name) == ("ii", deb_version(p)), f"{name} is not installed"


# --- gRPC -------------------------------------------------------------------------------------

def _stubs():
    try:
        from ember.v1 import node_pb2, node_pb2_grpc
    except ImportError as e:
        raise AssertionError(f"no Python gRPC stubs in {BUILD}/py ({e}): run `make pystubs`")
    return node_pb2, node_pb2_grpc


@contextlib.contextmanager
def channel(socket=SOCKET, **kw):
    """A gRPC channel to the agent's unix socket."""
    import grpc
    ch = grpc.insecure_channel("unix:" + socket, **kw)
    try:
        yield ch
    finally:
        ch.close()


def node_stub(ch):
    return _stubs()[1].NodeStub(ch)


def get_node(socket=SOCKET, timeout=10):
    node_pb2, node_pb2_grpc = _stubs()
    with channel(socket) as ch:
        return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(), timeout=timeout)


def emberd_version(binary="/usr/sbin/emberd"):
    """The version `emberd --version` prints ("emberd 0.1.0" -> "0.1.0")."""
    out = run(binary, "--version").stdout.split()
    return out[1] if len(out) > 1 else ""


def proc_exe(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def process_alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return re.sub(r"^.*\) ", "", f.read())[:1] != "Z"
    except OSError:
        return False

