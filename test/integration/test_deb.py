# The Debian packaging's inputs, checked fast on every `make check` (`make deb` itself, with
# lintian, runs in CI): one version, manual pages that groff renders without a warning and an
# ember.conf(5) that lists every key emberd knows, a journal catalog entry for every
# MESSAGE_ID, and `make install PREFIX=/usr` producing exactly what debian/*.install ship.

import os
import re
import subprocess

from conftest import BUILD, SRCDIR

PACKAGES = ("ember", "ember-guest", "ember-fcsim")


def changelog_version():
    with open(os.path.join(SRCDIR, "debian", "changelog")) as f:
        return re.match(r"ember \(([^)]+)\)", f.readline()).group(1)


def make_install(dest):
    b = os.path.relpath(BUILD, SRCDIR)
    subprocess.run(["make", "-s", "-C", SRCDIR, f"B={b}", "install", f"DESTDIR={dest}",
                    "PREFIX=/usr"], check=True, capture_output=True)


def installed_files(dest):
    out = set()
    for root, _dirs, files in os.walk(dest):
        for f in files:
            out.add(os.path.relpath(os.path.join(root, f), dest))
    return out


def groff_warnings(page):
    """What man(1) says about a page when it renders it as lintian does."""
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    r = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", page],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, (page, r.stderr)
    return r.stderr.strip()


def test_one_version():
    version = changelog_version()
    r = subprocess.run([os.path.join(BUILD, "emberd"), "--version"], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == f"emberd {version}"


def test_install_matches_the_packages(workdir):
    dest = os.path.join(workdir, "dest")
    make_install(dest)
    files = installed_files(dest)
    claimed = {}
    for pkg in PACKAGES:
        with open(os.path.join(SRCDIR, "debian", f"{pkg}.install")) as f:
            for line in f:
                path = line.split("#")[0].strip()
                if not path:
                    continue
                hits = {p for p in files if p == path or p.startswith(path.rstrip("/") + "/")}
                assert hits, f"debian/{pkg}.install: {path} is not installed by make install"
                for p in hits:
                    assert p not in claimed, f"{p} in both {claimed[p]} and {pkg}"
                    claimed[p] = pkg
    assert files == set(claimed), f"installed but in no package: {sorted(files - set(claimed))}"
    # Where emberd looks for its helpers and the demo template's parts (agent/vmm.c,
    # agent/demo.c): next to it, ../lib/ember, ../lib/ember/guest, ../bin.
    for p in ("usr/sbin/emberd", "usr/lib/ember/ember-uffd", "usr/lib/ember/fcsim",
              "usr/lib/ember/guest/ember-init", "usr/lib/ember/guest/ember-guest",
              "usr/bin/ember-mkrootfs", "etc/ember/ember.conf",
              "lib/systemd/system/emberd.service", "usr/lib/systemd/catalog/ember.catalog"):
        assert p in files, p


def test_manual_pages(workdir):
    dest = os.path.join(workdir, "dest")
    make_install(dest)
    mandir = os.path.join(dest, "usr/share/man")
    pages = [os.path.join(root, f) for root, _d, fs in os.walk(mandir) for f in fs]
    names = sorted(os.path.basename(p) for p in pages)
    assert names == ["ember-guest.8", "ember-init.8", "ember-mkrootfs.1", "ember-uffd.8",
                     "ember.conf.5", "emberd.8", "fcsim.1"]
    version = changelog_version()
    for page in pages:
        text = open(page).read()
        assert "@VERSION@" not in text and "@KEYS@" not in text, page
        assert f'"ember {version}"' in text, page
        assert groff_warnings(page) == "", page

    # ember.conf(5) is generated from ember.conf: every key emberd knows, with its default.
    conf5 = open(os.path.join(mandir, "man5", "ember.conf.5")).read()
    dump = subprocess.run([os.path.join(BUILD, "emberd"), "--config", "/dev/null",
                           "--dump-config"], capture_output=True, text=True, check=True).stdout
    documented = set(re.findall(r'^\.B "([a-z0-9_]+) =', conf5, re.M))
    keys = set(re.findall(r"^([a-z0-9_]+) =", dump, re.M))
    assert keys and keys <= documented, f"not in ember.conf(5): {sorted(keys - documented)}"


def test_catalog_covers_every_message_id():
    with open(os.path.join(SRCDIR, "agent", "messages.h")) as f:
        ids = set(re.findall(r'#define EMBER_MESSAGE_\w+\s+"([0-9a-f]{32})"', f.read()))
    with open(os.path.join(SRCDIR, "debian", "ember.catalog")) as f:
        entries = re.findall(r"^-- ([0-9a-f]{32})\n(.*?)(?=^-- |\Z)", f.read(), re.M | re.S)
    assert ids and ids <= {i for i, _ in entries}, sorted(ids - {i for i, _ in entries})
    for i, body in entries:
        assert re.search(r"^Subject: \S", body, re.M), i
