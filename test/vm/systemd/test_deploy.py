# ember deployed as a Debian host runs it: the packages from build/deb installed with apt-get,
# emberd started by systemd (Type=notify), a bad configuration, removal and purge.
# Runs in test/vm/run --systemd (make check-deploy); the fixtures are in deploy_plugin.py.

import os
import re
import stat
import time

from deploylib import (CONFIG, SOCKET, SRCDIR, STATE_DIR, UNIT, apt_get, channel,
                       emberd_version, get_node, is_active, node_stub, package_state, proc_exe,
                       process_alive, runs_last, systemctl, unit_cgroup, unit_prop, unit_props,
                       wait_for)

pytest_plugins = ["deploy_plugin"]

BAD_CONFIG = "[api]\nbogus = 1\n"
EX_CONFIG = 78


def test_installed_agent_starts_and_answers(emberd):
    # The postinst starts the unit already; `systemctl start` returned only after READY=1
    # (Type=notify), so the socket must answer at once, without a retry loop.
    props = unit_props(UNIT, "Type", "ActiveState", "SubState", "NRestarts", "UnitFileState")
    assert props["Type"] == "notify"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["NRestarts"] == "0"
    assert props["UnitFileState"] == "enabled", "the package enables emberd.service"
    assert proc_exe(emberd) == "/usr/sbin/emberd"
    assert unit_cgroup(emberd) == f"/system.slice/{UNIT}"
    assert stat.S_ISSOCK(os.stat(SOCKET).st_mode)

    node = get_node()
    assert node.node_id
    assert node.agent_version == emberd_version()


def test_bad_config_fails_with_78_and_is_not_restarted(emberd, journal):
    with open(CONFIG, "rb") as f:
        good = f.read()
    try:
        with open(CONFIG, "w") as f:
            f.write(BAD_CONFIG)
        r = systemctl("restart", UNIT)
        assert r.returncode != 0, "systemctl restart succeeded with a bad configuration"
        props = unit_props(UNIT, "ExecMainStatus", "Result", "ActiveState", "NRestarts",
                           "RestartUSec")
        assert props["ExecMainStatus"] == str(EX_CONFIG), props
        assert props["Result"] == "exit-code", props
        # Restart=on-failure would come back after RestartSec; RestartPreventExitStatus=78 must
        # stop it. Wait that long twice over and look again.
        time.sleep(2 * max(_seconds(props["RestartUSec"]), 1) + 1)
        props = unit_props(UNIT, "ActiveState", "NRestarts", "ExecMainStatus")
        assert props["NRestarts"] == "0", f"restarted despite exit status 78: {props}"
        assert props["ActiveState"] == "failed", props
        assert "bogus" in journal.text(unit=UNIT), \
            "emberd's refusal does not name the bad key in the journal"
    finally:
        with open(CONFIG, "wb") as f:
            f.write(good)
        systemctl("reset-failed", UNIT)
    r = systemctl("start", UNIT)
    assert r.returncode == 0, f"emberd does not start again with its configuration restored:\n" \
                              f"{r.stdout}{r.stderr}"
    assert is_active() == "active"
    assert get_node().node_id


def _seconds(timespan):
    """systemd's "2s", "1min 30s", "500ms" in seconds (float)."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600}
    total = 0.0
    for part in timespan.split():
        for u in sorted(units, key=len, reverse=True):
            if part.endswith(u) and part[:-len(u)].replace(".", "", 1).isdigit():
                total += float(part[:-len(u)]) * units[u]
                break
    return total


def test_status_shows_a_pull_in_progress(emberd, tmp_path):
    """`systemctl status emberd` names a template pull while it runs (STATUS=), and the
    pulled template is READY in the packaged layout."""
    import hashlib
    import sys
    sys.path.insert(0, os.path.join(SRCDIR, "test", "integration"))
    from pullserver import PullServer
    from ember.v1 import node_pb2 as S

    files = {}
    for name, size in (("kernel", 64 << 10), ("rootfs", 6 << 20)):
        files[name] = tmp_path / name
        files[name].write_bytes(os.urandom(size))
    with PullServer() as srv, channel() as ch:
        srv.add("/kernel", str(files["kernel"]))
        srv.add("/rootfs", str(files["rootfs"]), rate=1 << 20)  # about 6 s
        arts = {a: S.RemoteArtifact(url=srv.url("/" + a),
                                    sha256=hashlib.sha256(files[a].read_bytes()).hexdigest())
                for a in files}
        call = node_stub(ch).PullTemplate(S.PullTemplateRequest(template_id="pulled", **arts),
                                          timeout=120)
        assert next(call).phase == S.PULL_PHASE_DOWNLOADING
        status = wait_for(lambda: "pulling pulled" in unit_prop(UNIT, "StatusText") and
                          unit_prop(UNIT, "StatusText"), 20, "the pull in the unit's status")
        assert re.search(r"; pulling pulled \d+%", status), status
        last = list(call)[-1]
        assert last.phase == S.PULL_PHASE_DONE, last
        assert last.template.rootfs.path == f"{STATE_DIR}/templates/pulled/rootfs.ext4"
    wait_for(lambda: "pulling" not in unit_prop(UNIT, "StatusText"), 10,
             "the finished pull to leave the status")
    with channel() as ch:
        node_stub(ch).DeleteTemplate(S.DeleteTemplateRequest(template_id="pulled"), timeout=30)


@runs_last
def test_remove_stops_agent_and_purge_removes_state(emberd):
    pid = emberd
    apt_get("remove", "ember")
    assert not process_alive(pid), "emberd still runs after apt-get remove ember"
    assert is_active() != "active"
    assert package_state("ember")[0] == "rc"
    # Debian policy: remove keeps the configuration and the state, purge deletes them.
    assert os.path.exists(CONFIG), "apt-get remove deleted the conffile"
    assert os.path.isdir(STATE_DIR), "apt-get remove deleted the agent's state"

    apt_get("purge", "ember")
    assert package_state("ember")[0] in ("un", "pn")
    assert not os.path.exists(STATE_DIR), f"{STATE_DIR} is left after purge"
    assert not os.path.exists("/etc/ember"), "/etc/ember is left after purge"
    assert unit_props(UNIT, "LoadState")["LoadState"] == "not-found"
