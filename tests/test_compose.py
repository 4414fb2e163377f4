import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_docker_compose_file_is_valid():
    binary = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    res = subprocess.run([binary, "-f", str(REPO / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "prefect-server" in res.stdout and "dask-scheduler" in res.stdout
    assert "127.0.0.1" in res.stdout  # the UI is not exposed beyond this host
