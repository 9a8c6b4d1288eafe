"""Acceptance: two real debootstrapped Debian guests, hashified, served by cowfs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT, Mounts, cowfs, have, run
from test_hashify import manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def debian_guests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if not have("debootstrap"):
        pytest.skip("debootstrap is not installed (tools/install.sh installs it)")
    base = tmp_path_factory.mktemp("debian")
    guests = [base / "deb1", base / "deb2"]
    run(ROOT / "tools" / "mkguest-debian.sh", guests[0], "1")
    run(ROOT / "tools" / "mkguest-debian.sh", guests[1], "2")
    return guests


def test_hashified_debian_guests_read_the_same_and_write_privately(
    debian_guests: list[Path], tmp_path: Path, mounts: Mounts
) -> None:
    deb1, deb2 = debian_guests
    before = manifest([deb1, deb2])
    store = tmp_path / "store"
    report = json.loads(cowfs("hashify", "--json", "--store", store, deb1, deb2).stdout)
    assert report["unified_files"] > 1000
    assert report["bytes_saved"] > 50 * 2**20
    assert manifest([deb1, deb2]) == before
    # the same files, read through cowfs mounts
    m1 = mounts.mount(deb1, tmp_path / "m1", "--dev")
    m2 = mounts.mount(deb2, tmp_path / "m2", "--dev")
    for guest, mnt in ((deb1, m1), (deb2, m2)):
        old = os.fsencode(guest)
        expected = {
            os.fsencode(mnt) + p[len(old) :]: v
            for p, v in before.items()
            if p.startswith(old + b"/")
        }
        assert manifest([mnt]) == expected
    # dpkg checks every installed file against its package's md5sums
    for mnt in (m1, m2):
        result = run("chroot", mnt, "dpkg", "--verify", check=False)
        assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # a write in one guest after hashify stays private to it
    license_file = "usr/share/common-licenses/GPL-3"
    assert (deb1 / license_file).stat().st_ino == (deb2 / license_file).stat().st_ino
    run("chroot", m1, "/bin/sh", "-c", f"echo 'guest one was here' >> /{license_file}")
    run("chroot", m1, "/bin/sh", "-c", "sed -i 's/^root:/ROOT:/' /etc/passwd")
    assert (m1 / license_file).read_text().endswith("guest one was here\n")
    assert not (m2 / license_file).read_text().endswith("guest one was here\n")
    assert (deb2 / "etc/passwd").read_text().startswith("root:")
    assert "guest one" not in run("chroot", m2, "/bin/cat", f"/{license_file}").stdout
    assert cowfs("store", "verify", "--store", store).stdout.endswith("0 bad\n")
