# A PAUSED sandbox survives a reboot: two boots of the test VM (test/vm/run, device-mapper and
# fcsim inside), with emberd's state_dir on an ext4 image kept on the host between them. The
# first boot creates a sandbox, writes a file in it and pauses it; the second, a new kernel
# with no device, namespace or process of the first, finds it PAUSED and resumes it with its
# file. The phases are test/vm/reboot-phase.py.

import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD, SLOW, SRCDIR

RUN = os.path.join(SRCDIR, "test", "vm", "run")
PHASE = os.path.join(SRCDIR, "test", "vm", "reboot-phase.py")
MODULES = "loop,dm-mod,dm-snapshot,ext4,veth,tun,nf_tables,nft_chain_nat,nft_nat,nft_ct,nft_masq"

pytestmark = pytest.mark.skipif(not os.path.exists("/boot") or not any(
    f.startswith("vmlinuz-") for f in os.listdir("/boot")), reason="no kernel in /boot")


def test_paused_sandbox_survives_a_reboot():
    # in the repository share: the one place both boots can write and read
    work = tempfile.mkdtemp(prefix="vm-reboot-", dir=BUILD)
    image = os.path.join(work, "state.ext4")
    try:
        with open(image, "wb") as f:
            f.truncate(1 << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        env = dict(os.environ, EMBER_BUILD=BUILD)
        for phase in ("before", "after"):
            r = subprocess.run([RUN, "--timeout", str(int(900 * SLOW)), "--modules", MODULES,
                                "--", "/usr/bin/python3", PHASE, phase, image],
                               cwd=SRCDIR, capture_output=True, text=True, env=env,
                               timeout=1000 * SLOW)
            assert r.returncode == 0, (phase, r.stdout[-4000:], r.stderr[-4000:])
            assert f"phase {phase}:" in r.stdout, r.stdout[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
