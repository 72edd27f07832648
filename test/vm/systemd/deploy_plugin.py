# Deployment tests: ember's Debian packages installed and run by systemd, in a VM whose PID 1 is
# the host's systemd: `test/vm/run --systemd -- python3 -m pytest -q test/vm/systemd` (make
# check-deploy). Anywhere else (the host, the normal VM of make check-vm) they skip; without
# build/deb/ember_*.deb (make deb) the tests that need the packages skip.
#
# This module is their pytest plugin (deploylib.py has the helpers): each test module here says
#     pytest_plugins = ["deploy_plugin"]
# It is not a conftest.py on purpose: test/vm/test_*.py import test/vm/conftest.py as `conftest`,
# and pytest imports every conftest.py under that name, the last one winning.
#
# Fixtures: debs (the .debs, or skip), installed (the packages installed, whatever a test before
# did), emberd (installed and active; its MainPID), journal (a Journal from the test's start).
# Helpers (deploylib.py): run, systemctl, unit_props, Journal, apt_get (offline), channel and
# get_node (gRPC). A test that removes or purges the packages is decorated @deploylib.runs_last:
# it runs after all the others, so that they need not install again.

import os

import pytest

from deploylib import (DEBDIR, HERE, PACKAGES, UNIT, Journal, ensure_installed, find_debs,
                       is_active, main_pid, systemctl, under_systemd, unit_log_tail)


def _mine(item):
    return str(item.path).startswith(HERE + os.sep)


def pytest_collection_modifyitems(config, items):
    mine = [i for i in items if _mine(i)]
    if not under_systemd():
        skip = pytest.mark.skip(reason="needs systemd as PID 1 in the test VM: "
                                       "run through `make check-deploy` (test/vm/run --systemd)")
        for item in mine:
            item.add_marker(skip)
    last = {id(i) for i in mine if getattr(getattr(i, "function", None), "ember_runs_last", 0)}
    items.sort(key=lambda i: id(i) in last)  # stable: the order stays otherwise


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed deployment test shows what emberd logged: nobody can log in to the VM."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call") and _mine(item) and under_systemd():
        rep.sections.append((f"journal of {UNIT} (last lines)", unit_log_tail()))


@pytest.fixture(scope="session")
def debs():
    found = find_debs()
    if "ember" not in found:
        pytest.skip(f"no {DEBDIR}/ember_*.deb: build the packages first (make deb)")
    missing = [p for p in PACKAGES if p not in found]
    assert not missing, f"{DEBDIR} has ember but not {missing}: a partial `make deb`?"
    return found


@pytest.fixture
def installed(debs):
    """ember, ember-fcsim and ember-guest installed from build/deb (again, if a test before
    removed them)."""
    ensure_installed(debs)
    return debs


@pytest.fixture
def emberd(installed):
    """The packages installed and emberd.service active; returns its MainPID."""
    r = systemctl("start", UNIT)
    assert r.returncode == 0, f"systemctl start {UNIT} failed:\n{r.stdout}{r.stderr}"
    assert is_active() == "active"
    return main_pid()


@pytest.fixture
def journal():
    return Journal()
