"""The experiment-tracking seam between the trainer and whatever records runs.

models/ never imports MLflow: the trainer talks to a `Tracker`, and studies/tracking.py implements it
with MLflow (`MlflowTracker`). `NullTracker` drops everything (library use without tracking) and
`MemoryTracker` keeps everything in lists, which is what the tests read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """What the trainer logs. Metric names are plain identifiers (see the contract's MLflow section)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters (the flat config); re-logging an identical value is a no-op."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics at a training step (`None` for run-level final values)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts, under the folder `artifact_path`."""

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store a JSON-serialisable object as the artifact file `artifact_file` (replacing it)."""

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """Store a column table (MLflow `log_table` JSON format), *replacing* any earlier version.

        Replace, not append (MLflow's own `log_table` appends): the trainer always passes the whole table,
        so a resumed run never ends up with duplicated rows.
        """

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags."""

    def log_image(self, image: Any, key: str, step: int | None = None) -> None:
        """Record a PIL image as step `step` of the image series `key` (MLflow's image slider), beside any
        plain artifact of the same picture."""


class NullTracker:
    """Drops everything: `train()` without a tracker."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_image(self, image: Any, key: str, step: int | None = None) -> None:
        pass


class MemoryTracker:
    """Keeps everything in memory; artifacts are copied into `artifact_dir` when one is given.

    `metrics[name]` is a list of `(step, value)` in logging order, so tests can compare curves exactly.
    """

    def __init__(self, artifact_dir: str | Path | None = None) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.dicts: dict[str, Any] = {}
        self.tables: dict[str, dict[str, list[Any]]] = {}
        self.tags: dict[str, str] = {}
        self.images: dict[str, list[tuple[int | None, tuple[int, int]]]] = {}  # key -> (step, image size)
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: artifact does not exist")
        self.artifacts.append((str(path), artifact_path))
        if self.artifact_dir is not None:
            dest = self.artifact_dir / (artifact_path or "")
            dest.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, dest / path.name, dirs_exist_ok=True)
            else:
                shutil.copy2(path, dest / path.name)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.dicts[artifact_file] = json.loads(json.dumps(obj))  # a snapshot, and proof it serialises

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        self.tables[artifact_file] = {k: list(v) for k, v in data.items()}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_image(self, image: Any, key: str, step: int | None = None) -> None:
        self.images.setdefault(key, []).append((step, tuple(image.size)))

    def series(self, name: str) -> list[tuple[int | None, float]]:
        """The logged `(step, value)` pairs of one metric (empty when never logged)."""
        return list(self.metrics.get(name, []))
