"""ctxload as a user installs it: the sdist and the wheel build offline, the wheel holds the files
the code reads at run time, and the wheel installed in a fresh venv runs `ctxload demo` from a
directory outside the repository.

The fresh venv gets the wheel with --no-deps; its dependencies come from the venv running the
tests, through a .pth line naming that venv's site-packages.  A plain path line adds the
directory to sys.path without processing the .pth files in it, so the editable install of the
repository is not picked up there: the test checks that ctxload imports from the new venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

#: what the code reads from its own package directory, relative to site-packages
DATA = sorted(
    [f"loadgen/scenarios/{p.name}" for p in (REPO / "loadgen" / "scenarios").glob("*.yaml")]
    + ["loadgen/data/long_text.txt", "loadgen/data/example_trace.jsonl"]
    + [f"ctxload/dashboards/{p.name}" for p in (REPO / "ctxload" / "dashboards").glob("*.json")])


def _run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """`python -m build --no-isolation`: the sdist, then the wheel built from it (no network)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], timeout=300)
    (wheel,), (sdist,) = out.glob("ctxload-*.whl"), out.glob("ctxload-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_and_sdist_hold_the_data_files_and_the_command(dist):
    assert len([d for d in DATA if d.startswith("loadgen/scenarios/")]) >= 7
    assert len([d for d in DATA if d.startswith("ctxload/dashboards/")]) == 3
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert [d for d in DATA if d not in names] == []
    assert "[console_scripts]\nctxload = ctxload.cli:main" in entry_points
    assert {n.split("/")[0] for n in names if not n.startswith("ctxload-")} == \
        {"ctxload", "loadgen", "servers", "analysis", "rundir"}  # no tests, docs or deploy in site-packages
    with tarfile.open(dist["sdist"]) as t:
        root = t.getnames()[0].split("/")[0]
        assert [d for d in DATA if f"{root}/{d}" not in t.getnames()] == []


def test_installed_wheel_runs_the_demo_outside_the_repository(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--isolated", "--python", python, "install", "--no-deps",
          "--no-index", "--no-cache-dir", "--disable-pip-version-check", dist["wheel"]], timeout=300)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     timeout=60).stdout.strip())
    # the dependencies: this venv's site-packages as plain directories (their .pth files unread)
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "ctxload-test-deps.pth").write_text("".join(f"{d}\n" for d in deps))

    work = tmp_path / "work"  # the current directory: outside the repository
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CTXLOAD_MODELS=str(tmp_path / "models"))
    where = _run([python, "-c", "import ctxload, loadgen.scenario as s, servers, analysis\n"
                  "for m in (ctxload, s, servers, analysis): print(m.__file__)\nprint(s.BUILTIN)"],
                 timeout=120, cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), (site, where)
    assert not any(Path(p).resolve().is_relative_to(REPO) for p in where), where

    t0 = time.monotonic()
    r = _run([venv / "bin" / "ctxload", "demo", "--prompt-tokens", "64,128", "--requests", "1",
              "--runs-dir", tmp_path / "runs", "--run-id", "demo"], timeout=600, cwd=work, env=env)
    report = tmp_path / "runs" / "demo" / "report" / "report.html"
    assert report.exists(), r.stdout[-3000:]
    assert str(report) in r.stdout
    assert list(work.iterdir()) == []  # nothing written into the current directory
    print(f"installed demo took {time.monotonic() - t0:.0f} s")
