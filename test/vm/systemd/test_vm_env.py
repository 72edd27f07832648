# What test/vm/run --systemd gives the deployment tests, checked first-hand, so that a failure in
# test_deploy.py is not a broken test VM in disguise: systemd as PID 1 on cgroup v2, the system
# bus, systemd-machined, the journal, transient units, the repository writable.

import os
import tempfile

from deploylib import BUILD, Journal, is_active, main_pid, run, systemctl, unit_cgroup

pytest_plugins = ["deploy_plugin"]


def test_systemd_is_pid1_on_cgroup_v2():
    with open("/proc/1/comm") as f:
        assert f.read().strip() == "systemd"
    assert run("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    assert unit_cgroup(os.getpid()) == "/system.slice/ember-job.service"


def test_system_bus_and_machined():
    r = run("busctl", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "GetUnit", "s", "ember-job.service")
    assert "/org/freedesktop/systemd1/unit/ember_2djob_2eservice" in r.stdout
    run("machinectl", "list", "--no-legend")  # activates systemd-machined over the bus
    assert is_active("systemd-machined.service") == "active"


def test_transient_unit_start_restart_and_journal():
    unit = f"ember-vm-probe-{os.getpid()}.service"
    journal = Journal()
    run("systemd-run", f"--unit={unit}", "sleep", "600")
    try:
        assert is_active(unit) == "active"
        first = main_pid(unit)
        assert systemctl("restart", unit).returncode == 0
        assert is_active(unit) == "active" and main_pid(unit) not in (0, first)
    finally:
        systemctl("stop", unit)
    assert any("Started" in m for m in journal.messages(unit=unit)), journal.text(unit=unit)


def test_like_the_normal_mode():
    assert os.environ.get("EMBER_IN_VM") == "1"
    with tempfile.NamedTemporaryFile(dir=BUILD, prefix="vm-write-probe-"):
        pass  # the repository is writable
    assert not os.path.exists("/dev/kvm"), "no KVM in the test VMs (see test/vm/run)"
    assert not os.path.exists("/usr/sbin/policy-rc.d"), "services would not start on install"
