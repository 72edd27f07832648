# ember-uffd with 2 MiB pages needs a huge page pool (vm.nr_hugepages), which a test must not
# change on a shared host: here, in the VM's own kernel, the pool is set up and the unit test
# that serves hugetlb memory (test-uffd's test_huge) must run instead of skipping.

import os

from conftest import BUILD, run


def test_uffd_serves_2m_pages():
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write("32")
    with open("/proc/sys/vm/nr_hugepages") as f:
        assert int(f.read()) >= 16, "the VM kernel could not reserve 16 huge pages"
    try:
        r = run(os.path.join(BUILD, "test", "unit", "test-uffd"), check=False, timeout=600,
                env=dict(os.environ, TEST_FILTER="test_huge*"))
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert "[       OK ] test_huge" in out, out
        assert "SKIPPED" not in out, out
    finally:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write("0")
