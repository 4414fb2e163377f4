"""The run folder: where every output of a run and of its experiment lives.

The data stages (select to crops) write into ``out`` and are shared by every experiment;
each experiment trains and reports into ``out/experiments/<name>/``. ``RunFolder`` is
the one place that names these paths; the flow builds one per run and hands it to each
stage (``flows.stages``), and ``kface predict --model OUT`` finds a run's model with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    out: Path
    experiment: str = "default"
    MODEL = "model"  # an experiment's model folder's name (class constant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    # the run's data (shared by experiments)
    @property
    def config(self) -> Path:
        return self.out / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.parquet"

    @property
    def file_hashes(self) -> Path:
        """The photos' sha256 by path, size and mtime (``core.content``'s stat cache)."""
        return self.out / "file_hashes.parquet"

    @property
    def detections(self) -> Path:
        return self.out / "detections"

    @property
    def faces(self) -> Path:
        return self.out / "faces.parquet"

    @property
    def split(self) -> Path:
        return self.out / "split.parquet"

    @property
    def crops(self) -> Path:
        return self.out / "crops"

    @property
    def stages(self) -> Path:
        return self.out / "stages"

    @property
    def experiments(self) -> Path:
        return self.out / "experiments"

    # the experiment's own
    @property
    def experiment_dir(self) -> Path:
        return self.experiments / self.experiment

    @property
    def experiment_config(self) -> Path:
        return self.experiment_dir / "config.yaml"

    @property
    def model(self) -> Path:
        return self.experiment_dir / self.MODEL

    @property
    def model_file(self) -> Path:
        return self.model / "model.keras"

    @property
    def logs(self) -> Path:
        return self.experiment_dir / "logs"

    @property
    def reports(self) -> Path:
        return self.experiment_dir / "reports"

    @property
    def report(self) -> Path:
        return self.reports / "report.md"

    @property
    def experiment_stages(self) -> Path:
        return self.experiment_dir / "stages"

    def experiment_names(self) -> list[str]:
        """The experiments this run folder holds (their folders), sorted."""
        return sorted(f.name for f in self.experiments.glob("*")
                      if f.is_dir() and not f.name.startswith("."))

    def saved_config(self, experiment: str | None = None) -> Path | None:
        """The config a run left in this folder: the experiment's (when named and there),
        else the run folder's; None when there is none."""
        candidates = [self.out / "experiments" / experiment / "config.yaml"] if experiment else []
        return next((f for f in [*candidates, self.config] if f.is_file()), None)

    @staticmethod
    def latest(parent: Path) -> Path | None:
        """The most recently run run folder under ``parent`` (each run writes its
        config.yaml and stages/ there), or None."""
        runs = [f.parent for f in Path(parent).glob("*/config.yaml")
                if (f.parent / "stages").is_dir()]
        return max(runs, key=lambda folder: (folder / "config.yaml").stat().st_mtime,
                   default=None)

    def output(self, name: str) -> Path:
        """The file or folder whose existence says a stage output ``name`` (a stage
        table's ``reads``/``writes`` entry) is there: a model is its ``model.keras``, the
        reports their ``report.md``."""
        return {"model": self.model_file, "reports": self.report}.get(name) or getattr(
            self, name)
