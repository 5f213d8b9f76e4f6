"""N-way K-shot episode sampling for few-shot classification.

An episode draws ``ways`` distinct classes, then for each class ``shots + queries`` distinct
images: the first ``shots`` form the support set, the rest the query set. Episode labels are
0..ways-1 in the (random) order the classes were drawn; both sets are ordered by label
(``support_y = [0]*shots + [1]*shots + ...``), which is harmless for models that treat the
examples of a set independently.

With ``rotations=True`` every (character, quarter turn) pair is its own class, the data
augmentation of the MAML paper's Omniglot experiments (it multiplies the classes by four);
``flips=True`` makes each character's mirror image a class of its own too (times two).
``max_shift=s`` moves every image by a random whole number of pixels in -s..s along each
axis (zeros fill in): new drawings of the same class, not new classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tinymeta._checks import check_int

from ._rng import RngLike, as_generator
from .dataset import OmniglotDataset


class Episode(NamedTuple):
    """One episode (or a batch of them, with a leading ``T`` axis on every array)."""

    support_x: np.ndarray  # float32 (ways*shots, 1, S, S)
    support_y: np.ndarray  # int64 (ways*shots,) in 0..ways-1
    query_x: np.ndarray  # float32 (ways*queries, 1, S, S)
    query_y: np.ndarray  # int64 (ways*queries,)


@dataclass(frozen=True)
class EpisodeIndices:
    """What an episode is made of, before the images are gathered.

    ``classes[i]`` is the dataset character behind episode label ``i`` and ``rotations[i]``
    its number of counter-clockwise quarter turns (always 0 without rotations);
    ``support[i]`` / ``query[i]`` are the dataset image indices of label ``i``;
    ``flipped[i]`` says whether label ``i`` is the mirror image (left-right) of its character,
    applied before the rotation (always False without flips).
    """

    classes: np.ndarray  # int64 (ways,)
    rotations: np.ndarray  # int64 (ways,)
    support: np.ndarray  # int64 (ways, shots)
    query: np.ndarray  # int64 (ways, queries)
    flipped: np.ndarray | None = None  # bool (ways,); None: no flips


class EpisodeSampler:
    """Samples N-way K-shot episodes from an :class:`OmniglotDataset`.

    Args:
        dataset: the images to draw from (only ``images``, ``labels`` and, for
            ``same_alphabet``, ``char_alphabet`` are used).
        ways: classes per episode.
        shots: support images per class.
        queries: query images per class (may be 0).
        rng: ``None``, an int seed or a ``numpy.random.Generator``; a seed makes the sequence
            of episodes reproducible.
        rotations: treat each of the four 90-degree rotations of a character as a class.
        same_alphabet: draw all classes of an episode from one alphabet (chosen uniformly
            among the alphabets that have at least ``ways`` classes), like the official
            within-alphabet one-shot benchmark.
        flips: treat each character's mirror image as a class of its own (with
            ``rotations``, every rotation of the mirror image too).
        max_shift: move each image by up to this many pixels along each axis, independently
            per image and axis (0: no shifts).
    """

    def __init__(
        self,
        dataset: OmniglotDataset,
        ways: int,
        shots: int,
        queries: int,
        rng: RngLike = None,
        rotations: bool = False,
        same_alphabet: bool = False,
        flips: bool = False,
        max_shift: int = 0,
    ) -> None:
        self.dataset = dataset
        self.ways = check_int("ways", ways, "EpisodeSampler", low=1)
        self.shots = check_int("shots", shots, "EpisodeSampler", low=1)
        self.queries = check_int("queries", queries, "EpisodeSampler", low=0)
        self.rotations = bool(rotations)
        self.same_alphabet = bool(same_alphabet)
        self.flips = bool(flips)
        # A class's "views": its quarter turns (with rotations), each also mirrored (with flips).
        self._turns = 4 if self.rotations else 1
        self._views = self._turns * (2 if self.flips else 1)
        self.max_shift = check_int("max_shift", max_shift, "EpisodeSampler", low=0)
        if self.max_shift >= dataset.images.shape[-1]:
            raise ValueError(
                f"max_shift must be smaller than the image size {dataset.images.shape[-1]}, "
                f"got {self.max_shift}"
            )
        self.rng = as_generator(rng)

        per_class = self.shots + self.queries
        self._class_images = dataset.class_indices()
        eligible = np.array(
            [c for c, idx in enumerate(self._class_images) if len(idx) >= per_class], dtype=np.int64
        )
        # A "virtual class" is character * views + view, where a view is one of the
        # character's (mirror image, quarter turns) pairs: view = flipped * _turns + turns.
        views = self._views
        self._pool = (eligible[:, None] * views + np.arange(views)).ravel()
        if self.same_alphabet:
            alphabet_of = dataset.char_alphabet[self._pool // views]
            groups = [self._pool[alphabet_of == a] for a in np.unique(alphabet_of)]
            self._groups = [g for g in groups if len(g) >= self.ways]
            if not self._groups:
                raise ValueError(
                    f"no alphabet has {self.ways} classes with {per_class} images each"
                )
        elif len(self._pool) < self.ways:
            raise ValueError(
                f"{self.ways}-way episodes need {self.ways} classes with {per_class} images "
                f"each; the dataset has {len(self._pool)}"
            )

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(ways={self.ways}, shots={self.shots}, queries={self.queries}, "
            f"rotations={self.rotations}, same_alphabet={self.same_alphabet}, "
            f"flips={self.flips}, max_shift={self.max_shift}, classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes episodes are drawn from (characters, times 4 with rotations,
        times 2 with flips)."""
        return len(self._pool)

    def sample_indices(self) -> EpisodeIndices:
        """Draw the classes and image indices of one episode (no image is touched)."""
        pool = self._pool
        if self.same_alphabet:
            pool = self._groups[self.rng.integers(len(self._groups))]
        chosen = self.rng.choice(pool, size=self.ways, replace=False)
        classes, view = chosen // self._views, chosen % self._views
        rotations, flipped = view % self._turns, view // self._turns
        per_class = self.shots + self.queries
        picks = np.stack(
            [self.rng.choice(self._class_images[c], size=per_class, replace=False) for c in classes]
        )
        return EpisodeIndices(
            classes=classes.astype(np.int64),
            rotations=rotations.astype(np.int64),
            support=picks[:, : self.shots].astype(np.int64),
            query=picks[:, self.shots :].astype(np.int64),
            flipped=flipped.astype(bool) if self.flips else None,
        )

    def _gather(self, indices: np.ndarray, idx: EpisodeIndices) -> np.ndarray:
        """Images ``(ways * n, 1, S, S)`` for indices ``(ways, n)``: each class mirrored and
        rotated as ``idx`` says, then (with ``max_shift``) each image shifted."""
        images = self.dataset.images[indices]  # (ways, n, 1, S, S), a copy
        if idx.flipped is not None and idx.flipped.any():
            images[idx.flipped] = images[idx.flipped][..., ::-1]
        rotations = idx.rotations
        for k in np.unique(rotations[rotations > 0]):
            rows = rotations == k
            images[rows] = np.rot90(images[rows], k=int(k), axes=(-2, -1))
        images = images.reshape(-1, *images.shape[2:])
        return self._shift(images) if self.max_shift else images

    def _shift(self, images: np.ndarray) -> np.ndarray:
        """Move each image ``(M, 1, S, S)`` by its own random offset, filling in zeros."""
        s, size = self.max_shift, images.shape[-1]
        padded = np.pad(images, ((0, 0), (0, 0), (s, s), (s, s)))
        # Image m is the window of padded image m that starts at (s - dy, s - dx).
        start = self.rng.integers(0, 2 * s + 1, size=(2, len(images)))
        rows = start[0][:, None] + np.arange(size)  # (M, S)
        cols = start[1][:, None] + np.arange(size)
        m = np.arange(len(images))[:, None, None]
        return padded[m, 0, rows[:, :, None], cols[:, None, :]][:, None]

    def sample(self) -> Episode:
        """Draw one episode."""
        idx = self.sample_indices()
        labels = np.arange(self.ways, dtype=np.int64)
        return Episode(
            support_x=self._gather(idx.support, idx),
            support_y=np.repeat(labels, self.shots),
            query_x=self._gather(idx.query, idx),
            query_y=np.repeat(labels, self.queries),
        )

    def sample_batch(self, num_episodes: int) -> Episode:
        """Draw ``num_episodes`` episodes stacked along a new leading axis."""
        num_episodes = check_int("num_episodes", num_episodes, "EpisodeSampler.sample_batch")
        episodes = [self.sample() for _ in range(num_episodes)]
        return Episode(*(np.stack(field) for field in zip(*episodes, strict=True)))
