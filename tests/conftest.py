"""Shared fixtures: the real data folder, small K-Face trees made of real faces, and a
tiny pipeline config. ``../shared/data`` must exist in CI (tests fail, not skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        message = f"{path} is missing (set KFACE_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def aaf_dir(shared_data) -> Path:
    return _need(shared_data / "faces" / "aaf")


@pytest.fixture(scope="session")
def scenes_dir(shared_data) -> Path:
    return _need(shared_data / "scenes")


@pytest.fixture(scope="session")
def kface_tree(tmp_path_factory, aaf_dir) -> Path:
    """20 subjects x lights L1/L10 x cameras C4/C7 (80 photos, 40 selected by default),
    plus two bad files that fit the layout and one file that does not."""
    from tasks.sample_data import TreeSpec, build_kface_tree

    root = tmp_path_factory.mktemp("kface")
    build_kface_tree(aaf_dir, root, 20, TreeSpec(lights=("L1", "L10"), cameras=("C4", "C7")))
    folder = root / "High_Resolution" / "19062400" / "S001" / "L1" / "E01"
    (folder / "C8.jpg").write_bytes(b"")
    (folder / "C9.jpg").write_text("this is not a JPEG")
    (root / "High_Resolution" / "19062400" / "notes.txt").write_text("stray file")
    return root


def run_kface(*args: str, env: dict | None = None, timeout: int = 600
              ) -> subprocess.CompletedProcess:
    """Run the installed CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
