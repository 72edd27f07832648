#!/usr/bin/python3
"""One boot of test/integration/test_vm_reboot.py, run inside the VM by test/vm/run:

  reboot-phase.py before <image>   create a sandbox (dm backend, fcsim), write a file in it,
                                   pause it, stop emberd
  reboot-phase.py after <image>    in a new boot: the sandbox is PAUSED, resumes, has its file

emberd's state_dir lives on <image>, an ext4 file system on the host's disk (the repository
share), so it is all that survives from one boot to the next, as /var/lib does on a node;
run_dir, namespaces, dm and loop devices are new in every boot."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_emberd_dm import Agent, S, dm_names, guest_sh, kill_processes_in, run  # noqa: E402

phase, image = sys.argv[1], sys.argv[2]
mnt = "/mnt/ember-state"
os.makedirs(mnt, exist_ok=True)
run("mount", "-o", "loop", image, mnt)
root = "/tmp/ember-reboot"
os.makedirs(root, exist_ok=True)
a = Agent(root, state=os.path.join(mnt, "state"))
a.start()
try:
    n = a.stub()
    if phase == "before":
        n.CreateSandbox(S.CreateSandboxRequest(sandbox_id="r", spec=S.SandboxSpec(
            template_id="demo", memory_mib=128)), timeout=600)
        p = guest_sh(root, "r", "echo across-a-reboot > /root/f && sync")
        assert p.returncode == 0, p
        sb = n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="r"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_PAUSED, sb
        print("phase before: PAUSED")
    else:
        sb = n.GetSandbox(S.GetSandboxRequest(sandbox_id="r"), timeout=60)
        assert sb.state == S.SANDBOX_STATE_PAUSED, sb
        assert dm_names() == []
        sb = n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="r"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_RUNNING, sb
        p = guest_sh(root, "r", "cat /root/f")
        assert p.stdout.strip() == b"across-a-reboot", p
        n.DestroySandbox(S.DestroySandboxRequest(sandbox_id="r"), timeout=120)
        assert dm_names() == []
        print("phase after: resumed, file intact, destroyed")
finally:
    a.stop()
    kill_processes_in(root)
    subprocess.run(["umount", mnt])
