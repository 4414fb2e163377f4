"""Detector kinds are plugins (``models/detectors/``): a kind is one module with a
registered ``DetectorKind``; the settings, thresholds, cache keys, the detector and the
CLI's help come from the registry, and no code outside the package asks for a kind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

TOY_KIND = '''
import numpy as np
from pydantic import Field
from pathlib import Path
from models.detectors.base import DetectorKind, register

@register
class Toy(DetectorKind):
    name = "toy"
    description = "a test kind: one face in the middle of every photo"
    landmarks = True
    training_confidence, inference_confidence = 0.6, 0.5
    settings = {"toy_shift": (float, Field(0.0, ge=0, description="toy only: moves the face"))}
    own_settings = ("mean", "toy_shift")  # (res10's mean read too)

    def weights(self, cfg):
        return (Path(__file__),)

    def load(self, weights):
        return "toy network"

    def rows(self, net, image, cfg):
        assert net == "toy network"
        points = [0.4, 0.4, 0.6, 0.4, 0.5, 0.5, 0.42, 0.6, 0.58, 0.6]
        return np.array([[0.95, 0.25, 0.25, 0.75, 0.75, *points],
                         [0.40, 0.0, 0.0, 0.1, 0.1, *points]], np.float32)
'''

CHECK = '''
import toy_kind  # as a module in models/detectors/ is: imported before the registry is used
import numpy as np
from models.detector import (KINDS, LANDMARK_KINDS, DetectorConfig, FaceDetector,
                             gives_landmarks, result_settings)
from models.analyzer import inference_detector_config
cfg = DetectorConfig(kind="toy")
assert "toy" in KINDS and "toy" in LANDMARK_KINDS and gives_landmarks("toy")
from models.detector import CHIP_KIND
assert CHIP_KIND == "yunet", CHIP_KIND  # a role the kind declares, not the first found
assert cfg.confidence == 0.6, cfg.confidence  # its own training threshold
assert inference_detector_config(kind="toy").confidence == 0.5
settings = result_settings(cfg)
assert settings["kind"] == "toy" and "mean" in settings and "edge_rows" not in settings
assert settings["toy_shift"] == 0.0 and DetectorConfig(kind="toy", toy_shift=2).toy_shift == 2
assert "toy_shift" not in result_settings(DetectorConfig(kind="res10"))  # the toy's own
from models.detector import _kinds_settings
from models.detectors.base import KIND, DetectorError, register
class Again(type(KIND["toy"])):
    name = "again"
try:
    register(Again)  # declares toy_shift a second time
    _kinds_settings()
    raise SystemExit("a setting declared twice was accepted")
except DetectorError as exc:
    assert "'toy_shift' of kind 'again' is declared twice" in str(exc), exc
finally:
    KIND.pop("again")
assert "'toy': a test kind" in DetectorConfig.model_fields["kind"].description
faces = FaceDetector(cfg).detect(np.zeros((200, 400, 3), np.uint8))
assert len(faces) == 1 and faces[0].box == (100, 50, 300, 150), faces
assert faces[0].landmarks[0] == (160.0, 80.0), faces[0].landmarks
print("ok")
'''


def test_a_kind_is_one_module(tmp_path):
    (tmp_path / "toy_kind.py").write_text(TOY_KIND)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    # the CLI's help lists it too (its options are built from the registry)
    help_check = ("import toy_kind, sys; sys.argv = ['kface', 'predict', '--help']; "
                  "from cli.main import main; main()")
    res = subprocess.run([sys.executable, "-c", help_check], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert "toy" in res.stdout and "0.5 for toy" in res.stdout, res.stdout + res.stderr


def test_no_kind_is_spelled_outside_its_module():
    from models.detectors import KIND

    names = "|".join(KIND)
    spelled = re.compile(rf"""["']({names})["']|\.kind\s*[!=]=|kind\s*==""")
    found = []
    for folder in ("core", "models", "tasks", "flows", "cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.parent == REPO / "models" / "detectors":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if spelled.search(line.split("#")[0]):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
