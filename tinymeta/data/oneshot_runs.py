"""Reader for the official Omniglot one-shot classification runs (Lake et al., 2015).

Layout (``all_runs.zip`` or its extracted folder)::

    runNN/training/classMM.png   the one-shot examples, one per class
    runNN/test/itemMM.png        the test images
    runNN/class_labels.txt       lines "runNN/test/itemMM.png runNN/training/classKK.png"

As in the official evaluation script, training files are sorted by name and a class id is a
training file's position in that order (``class01.png`` -> 0); test items are sorted by name
too. Images get exactly the preprocessing of :func:`tinymeta.data.load_omniglot`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from ._image import check_image_size, decode_image, ink_to_float

LABELS_FILE = "class_labels.txt"


@dataclass(frozen=True, eq=False)
class OneShotRun:
    """One run: ``train_x``/``test_x`` float32 ``(n, 1, S, S)`` (ink = 1), int64 class ids."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]

    @property
    def ways(self) -> int:
        return len(self.train_y)


class _Source:
    """Uniform read access to a folder or a zip: POSIX relative names -> bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            self._zip = zipfile.ZipFile(path)
            self.names = {n for n in self._zip.namelist() if not n.endswith("/")}
        else:
            self.names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _open_source(path: Path) -> _Source:
    if not path.exists():
        raise FileNotFoundError(f"one-shot runs not found at {path}")
    source = _Source(path)
    # A folder without runs but holding the official zip: read the zip.
    if path.is_dir() and not _label_files(source) and (path / "all_runs.zip").is_file():
        source.close()
        return _Source(path / "all_runs.zip")
    return source


def _label_files(source: _Source) -> list[str]:
    return sorted(
        n for n in source.names if PurePosixPath(n).name == LABELS_FILE and "__MACOSX" not in n
    )


def _parse_labels(text: str, where: str) -> list[tuple[str, str]]:
    """``class_labels.txt`` -> [(test path, training path)] as written in the file."""
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                f"{where}:{lineno}: expected '<test png> <training png>', got {line!r}"
            )
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise ValueError(f"{where} lists no test items")
    return pairs


def _in_run(run_dir: PurePosixPath, listed: str, source: _Source, where: str) -> str:
    """Map a path as listed (``runNN/test/item01.png``) to its name in ``source``.

    Only the last two components are used, so the listing works whatever folder the runs
    were extracted into.
    """
    name = (run_dir / PurePosixPath(*PurePosixPath(listed).parts[-2:])).as_posix()
    if name not in source.names:
        raise FileNotFoundError(f"{where} names {listed}, but {name} is missing")
    return name


def _decode_all(source: _Source, names: Sequence[str], image_size: int) -> np.ndarray:
    ink = np.stack([decode_image(source.read(n), image_size) for n in names])
    return ink_to_float(ink)


def _read_run(source: _Source, labels_name: str, image_size: int) -> OneShotRun:
    run_dir = PurePosixPath(labels_name).parent
    where = f"{source.path}:{labels_name}"
    pairs = _parse_labels(source.read(labels_name).decode("utf-8"), where)
    answers = {
        _in_run(run_dir, test, source, where): _in_run(run_dir, train, source, where)
        for test, train in pairs
    }
    prefix = (run_dir / "training").as_posix() + "/"
    train_files = sorted(
        n for n in source.names if n.startswith(prefix) and n.lower().endswith(".png")
    )
    class_of = {name: i for i, name in enumerate(train_files)}
    test_files = sorted(answers)
    return OneShotRun(
        name=run_dir.name,
        train_x=_decode_all(source, train_files, image_size),
        train_y=np.arange(len(train_files), dtype=np.int64),
        test_x=_decode_all(source, test_files, image_size),
        test_y=np.array([class_of[answers[t]] for t in test_files], dtype=np.int64),
        train_files=tuple(train_files),
        test_files=tuple(test_files),
    )


def load_oneshot_runs(path: str | os.PathLike[str], image_size: int = 28) -> list[OneShotRun]:
    """Read every run under ``path`` (a folder of ``runNN/`` folders, ``all_runs.zip``, or a
    folder containing ``all_runs.zip``), sorted by run name.

    Raises:
        FileNotFoundError: ``path`` is missing, holds no ``class_labels.txt``, or a listed
            image is absent.
        ValueError: a malformed ``class_labels.txt``.
    """
    image_size = check_image_size(image_size)
    source = _open_source(Path(path).expanduser())
    try:
        labels = _label_files(source)
        if not labels:
            raise FileNotFoundError(f"no runNN/{LABELS_FILE} found in {source.path}")
        return [_read_run(source, name, image_size) for name in labels]
    finally:
        source.close()


def error_rate(predictions: Sequence[np.ndarray] | np.ndarray, runs: Sequence[OneShotRun]) -> float:
    """Fraction of all test items whose predicted class id is wrong.

    ``predictions[r]`` holds one predicted class id per test item of ``runs[r]`` (a 2-D array
    ``(runs, items)`` works too). With the official 20 runs of 20 items this is the benchmark's
    error rate over the 400 test items.
    """
    if len(predictions) != len(runs):
        raise ValueError(f"got predictions for {len(predictions)} runs, but {len(runs)} runs")
    if not runs:
        raise ValueError("error_rate needs at least one run")
    wrong = total = 0
    for pred, run in zip(predictions, runs, strict=True):
        pred = np.asarray(pred).reshape(-1)
        if pred.shape != run.test_y.shape:
            raise ValueError(
                f"run {run.name}: expected {len(run.test_y)} predictions, got {pred.shape[0]}"
            )
        wrong += int(np.count_nonzero(pred != run.test_y))
        total += len(run.test_y)
    return wrong / total
