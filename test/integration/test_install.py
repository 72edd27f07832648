# make install DESTDIR=… PREFIX=…: what lands where, and that the unit points at the binary.

import os
import subprocess

from conftest import BUILD, SRCDIR


def test_make_install(workdir):
    dest = os.path.join(workdir, "dest")
    b = os.path.relpath(BUILD, SRCDIR)
    subprocess.run(["make", "-s", "-C", SRCDIR, f"B={b}", "install", f"DESTDIR={dest}",
                    "PREFIX=/usr"], check=True, capture_output=True)
    emberd = os.path.join(dest, "usr/sbin/emberd")
    assert os.access(emberd, os.X_OK)
    assert subprocess.run([emberd, "--version"], capture_output=True,
                          text=True).stdout.startswith("emberd ")
    assert os.path.exists(os.path.join(dest, "etc/ember/ember.conf"))
    assert os.path.exists(os.path.join(dest, "usr/share/doc/ember/ember.conf.example"))
    unit = open(os.path.join(dest, "lib/systemd/system/emberd.service")).read()
    assert "ExecStart=/usr/sbin/emberd\n" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit
    # ember-uffd is emberd's helper, off PATH; the guest binaries wait for ember-mkrootfs, which
    # knows where they are.
    assert os.access(os.path.join(dest, "usr/lib/ember/ember-uffd"), os.X_OK)
    for name in ("ember-init", "ember-guest"):
        assert os.access(os.path.join(dest, "usr/lib/ember/guest", name), os.X_OK)
    mkrootfs = os.path.join(dest, "usr/bin/ember-mkrootfs")
    assert os.access(mkrootfs, os.X_OK)
    text = open(mkrootfs).read()
    assert '"/usr/lib/ember/guest"' in text and "@GUESTDIR@" not in text

    # A private prefix keeps everything under it.
    dest2 = os.path.join(workdir, "dest2")
    subprocess.run(["make", "-s", "-C", SRCDIR, f"B={b}", "install", f"DESTDIR={dest2}",
                    "PREFIX=/opt/ember"], check=True, capture_output=True)
    assert os.access(os.path.join(dest2, "opt/ember/sbin/emberd"), os.X_OK)
    assert os.path.exists(os.path.join(dest2, "opt/ember/etc/ember/ember.conf"))
    unit = open(os.path.join(dest2, "opt/ember/lib/systemd/system/emberd.service")).read()
    assert "ExecStart=/opt/ember/sbin/emberd\n" in unit
