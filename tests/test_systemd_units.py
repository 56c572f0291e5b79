"""contrib/systemd: the units are valid, hardened, and in step with each other.

``systemd-analyze verify`` checks both units, an instance of the template and
candy.service with the server drop-in (server.conf); ``systemd-analyze security
--offline=true`` scores their exposure, which must stay at or below :data:`MAX_EXPOSURE`
(measured with systemd 252: 1.7 "OK" for both units, 1.6 with server.conf, 1.5 with it
minus CAP_NET_BIND_SERVICE; 0 is a fully locked-down unit, 10 an unprotected one). Neither
command needs systemd to be running.

``verify`` insists that ExecStart's program exists. /usr/local/bin/candy is where the
units expect it; when it is not installed there, the shipped unit files are verified
unchanged with, as root, a private mount namespace in which a directory holding a copy of
the installed ``candy`` script is bound over /usr/local/bin (the host is not touched).
Without root, copies of the units whose ExecStart points at that script are verified
instead, and the test says so.

.ci/run installs systemd-analyze (package systemd) when it is missing; without it the
tests are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO_ROOT / "contrib" / "systemd"
UNITS = {"candy.service": "/etc/candy.cfg", "candy@.service": "/etc/candy.d/%i.cfg"}
EXEC_PATH = Path("/usr/local/bin/candy")
#: The highest acceptable exposure score; both units measured 1.7 with systemd 252.
MAX_EXPOSURE = 2.0
#: What is checked: the shipped units, an instance of the template, a server's candy.service.
VARIANTS = ["candy.service", "candy@.service", "candy@office.service", "candy.service+server"]

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (package systemd; .ci/run adds it)"
)
SCORE_RE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?) (\S+)")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


def settings(unit: str) -> list[tuple[str, str]]:
    """The unit's (key, value) lines in order, section headers as ("[Section]", "")."""
    lines = []
    for raw in (UNIT_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            lines.append((line, ""))
        else:
            key, _, value = line.partition("=")
            lines.append((key, value))
    return lines


def values(unit: str, key: str) -> list[str]:
    return [value for k, value in settings(unit) if k == key]


# --- static checks ------------------------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_candy_with_the_reference_config_path(unit: str) -> None:
    assert values(unit, "ExecStart") == [f"{EXEC_PATH} --no-timestamp -c {UNITS[unit]}"]
    assert values(unit, "Restart") == ["on-failure"]
    assert values(unit, "DynamicUser") == ["yes"] and values(unit, "User") == ["candy"]
    assert values(unit, "AmbientCapabilities") == ["CAP_NET_ADMIN"]
    assert values(unit, "CapabilityBoundingSet") == ["CAP_NET_ADMIN"]
    assert values(unit, "DeviceAllow") == ["/dev/net/tun rw"]
    assert values(unit, "StateDirectory") == ["candy"]
    assert values(unit, "RuntimeDirectory") == ["candy"]
    assert values(unit, "WantedBy") == ["multi-user.target"]


def test_the_template_is_the_plain_unit_with_an_instance_config() -> None:
    """Same settings, in the same order; only the config path and description differ."""
    differ = {"Description", "ExecStart"}
    strip = [(k, v) for k, v in settings("candy.service") if k not in differ]
    template = [(k, v) for k, v in settings("candy@.service") if k not in differ]
    assert strip == template
    assert "%i" in values("candy@.service", "Description")[0]


# --- systemd-analyze ----------------------------------------------------------------------


def _candy_script(tmp_path: Path) -> Path:
    """A copy of the installed ``candy`` console script, or a stand-in that runs this tree."""
    found = shutil.which("candy")
    target = tmp_path / "bin" / "candy"
    target.parent.mkdir()
    if found:
        shutil.copy(found, target)
    else:
        target.write_text(f'#!/bin/sh\nexec {sys.executable} -m shells.cli "$@"\n')
    target.chmod(0o755)
    return target


def stage(variant: str, tmp_path: Path) -> Path:
    """The unit file of ``variant``: the shipped file itself, or a tmp_path arrangement
    of unchanged shipped files (a symlink named for an instance, a drop-in directory)."""
    if variant in UNITS:
        return UNIT_DIR / variant
    if variant == "candy@office.service":
        path = tmp_path / variant
        path.symlink_to(UNIT_DIR / "candy@.service")
        return path
    assert variant == "candy.service+server"
    path = tmp_path / "server" / "candy.service"
    (path.parent / "candy.service.d").mkdir(parents=True)
    shutil.copy(UNIT_DIR / "candy.service", path)
    shutil.copy(UNIT_DIR / "server.conf", path.parent / "candy.service.d" / "server.conf")
    return path


def _verify_argv(unit: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    """(command prefix, unit path, how) to verify ``unit`` in this environment."""
    if os.access(EXEC_PATH, os.X_OK):
        return [], unit, f"{EXEC_PATH} is installed"
    script = _candy_script(tmp_path)
    if os.geteuid() == 0 and shutil.which("unshare"):
        bind = f'mount --bind {script.parent} {EXEC_PATH.parent} && exec "$@"'
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", bind, "sh"]
        how = f"unchanged, {EXEC_PATH.parent} bound to a copy of candy in a mount namespace"
        return prefix, unit, how
    copy = tmp_path / "rewritten" / unit.name
    copy.parent.mkdir()
    copy.write_text(unit.read_text().replace(str(EXEC_PATH), str(script)))
    dropins = unit.parent / f"{unit.name}.d"
    if dropins.is_dir():
        shutil.copytree(dropins, copy.parent / dropins.name)
    return [], copy, f"a copy with ExecStart={script} (not root: no mount namespace)"


@pytest.mark.parametrize("variant", VARIANTS)
def test_unit_passes_systemd_analyze_verify(variant: str, tmp_path: Path) -> None:
    prefix, unit, how = _verify_argv(stage(variant, tmp_path), tmp_path)
    assert ANALYZE is not None
    out = subprocess.run(
        [*prefix, ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    print(f"\nsystemd-analyze verify {variant} ({how}): exit {out.returncode}")
    print(out.stdout + out.stderr, end="")
    assert out.returncode == 0, out.stdout + out.stderr
    # Warnings (unknown keys, bad values) do not change the exit status: none may be ours.
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "candy" in line]
    assert not ours, "\n".join(ours)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exposure_score_is_low(variant: str, tmp_path: Path) -> None:
    out = analyze("security", "--offline=true", "--no-pager", str(stage(variant, tmp_path)))
    if "--offline" in out.stderr and "unrecognized" in out.stderr.lower():
        pytest.skip(f"this systemd-analyze has no --offline: {out.stderr.strip()}")
    match = SCORE_RE.search(out.stdout)
    assert match, f"no score in:\n{out.stdout}{out.stderr}"
    score, verdict = float(match.group(2)), match.group(3)
    exposed = [line.rstrip() for line in out.stdout.splitlines() if line.startswith("✗")]
    print(f"\n{variant}: {match.group(0)}\nstill exposed:\n" + "\n".join(exposed))
    assert score <= MAX_EXPOSURE, f"{variant}: exposure {score} {verdict} > {MAX_EXPOSURE}"
