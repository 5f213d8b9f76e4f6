"""The in-memory Omniglot dataset and its alphabet / character / drawer splits.

Label convention: ``labels`` index ``characters``. Filtering by alphabet or character shrinks
the character table (labels are renumbered 0..C'-1, keeping the original order); filtering by
drawer keeps the character table untouched, so a drawer split (e.g. drawers 1-15 for training
a classifier, 16-20 for testing it) shares one label space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from tinymeta._checks import check_int

from ._rng import RngLike, as_generator

CharacterKey = int | tuple[str, str]


@dataclass(frozen=True, eq=False)
class OmniglotDataset:
    """Omniglot images with per-image and per-character metadata.

    Attributes:
        images: float32 ``(N, 1, S, S)`` in [0, 1], ink = 1, paper = 0.
        labels: int64 ``(N,)`` character index into ``characters``.
        drawer: int64 ``(N,)`` drawer id (1..20), parsed from ``<id>_<drawer>.png``.
        alphabets: alphabet names.
        characters: ``(alphabet, character_folder)`` per character.
        char_alphabet: int64 ``(C,)`` index into ``alphabets`` per character.
        name: a short description of where the data came from.
    """

    images: np.ndarray
    labels: np.ndarray
    drawer: np.ndarray
    alphabets: list[str]
    characters: list[tuple[str, str]]
    char_alphabet: np.ndarray
    name: str = "omniglot"

    def __post_init__(self) -> None:
        n, c = len(self.labels), len(self.characters)
        if self.images.ndim != 4 or self.images.shape[:2] != (n, 1):
            raise ValueError(f"images must be (N, 1, S, S) with N={n}, got {self.images.shape}")
        if self.images.dtype != np.float32:
            raise ValueError(f"images must be float32, got {self.images.dtype}")
        for attr, size in (("labels", n), ("drawer", n), ("char_alphabet", c)):
            arr = getattr(self, attr)
            if arr.dtype != np.int64 or arr.shape != (size,):
                raise ValueError(
                    f"{attr} must be int64 of shape ({size},), got {arr.dtype} {arr.shape}"
                )
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise ValueError("labels must index characters")
        if c and (self.char_alphabet.min() < 0 or self.char_alphabet.max() >= len(self.alphabets)):
            raise ValueError("char_alphabet must index alphabets")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"OmniglotDataset(name={self.name!r}, images={len(self)}, "
            f"characters={self.num_classes}, alphabets={self.num_alphabets}, "
            f"image_size={self.image_size})"
        )

    @property
    def num_classes(self) -> int:
        """Number of characters (classes)."""
        return len(self.characters)

    @property
    def num_alphabets(self) -> int:
        return len(self.alphabets)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_alphabet(self) -> np.ndarray:
        """int64 ``(N,)`` alphabet index of every image."""
        return self.char_alphabet[self.labels]

    def class_indices(self) -> list[np.ndarray]:
        """Image indices of every character, in dataset order (``result[c]`` for class ``c``)."""
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return np.split(order, np.cumsum(counts)[:-1])

    def subset(
        self,
        alphabets: Iterable[str] | None = None,
        characters: Iterable[CharacterKey] | None = None,
        drawers: Iterable[int] | None = None,
    ) -> OmniglotDataset:
        """Keep only the given alphabets, characters and/or drawers (filters combine with AND).

        ``characters`` holds character indices or ``(alphabet, folder)`` pairs. Alphabet and
        character filters renumber the kept characters 0..C'-1 in their original order; the
        drawer filter keeps every character (see the module docstring).
        """
        keep_char = np.ones(self.num_classes, dtype=bool)
        if alphabets is not None:
            keep_char &= np.isin(self.char_alphabet, self._alphabet_ids(alphabets))
        if characters is not None:
            keep_char &= np.isin(np.arange(self.num_classes), self._character_ids(characters))
        keep_img = keep_char[self.labels]
        if drawers is not None:
            keep_img &= np.isin(self.drawer, np.fromiter(drawers, dtype=np.int64))

        kept_alpha = np.unique(self.char_alphabet[keep_char])  # sorted = original order
        alpha_map = np.full(self.num_alphabets, -1, dtype=np.int64)
        alpha_map[kept_alpha] = np.arange(len(kept_alpha))
        char_map = np.cumsum(keep_char, dtype=np.int64) - 1
        return OmniglotDataset(
            images=self.images[keep_img],
            labels=char_map[self.labels[keep_img]],
            drawer=self.drawer[keep_img],
            alphabets=[self.alphabets[i] for i in kept_alpha],
            characters=[ch for ch, k in zip(self.characters, keep_char, strict=True) if k],
            char_alphabet=alpha_map[self.char_alphabet[keep_char]],
            name=self.name,
        )

    def _alphabet_ids(self, names: Iterable[str]) -> np.ndarray:
        if isinstance(names, str):  # a lone name would otherwise be iterated letter by letter
            names = [names]
        index = {name: i for i, name in enumerate(self.alphabets)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"unknown alphabet(s) {missing}; this dataset has {self.alphabets}")
        return np.array([index[n] for n in names], dtype=np.int64)

    def _character_ids(self, keys: Iterable[CharacterKey]) -> np.ndarray:
        index = {ch: i for i, ch in enumerate(self.characters)}
        ids = []
        for key in keys:
            if isinstance(key, tuple):
                if key not in index:
                    raise KeyError(f"unknown character {key!r}")
                ids.append(index[key])
            elif 0 <= int(key) < self.num_classes:
                ids.append(int(key))
            else:
                raise IndexError(f"character index {key} out of range 0..{self.num_classes - 1}")
        return np.array(ids, dtype=np.int64)


def concatenate(datasets: Sequence[OmniglotDataset], name: str | None = None) -> OmniglotDataset:
    """Stack datasets; characters of later datasets are appended after earlier ones.

    Alphabets with the same name are merged into one entry (their characters stay distinct);
    to drop duplicated alphabets, ``subset`` them away first.
    """
    if not datasets:
        raise ValueError("concatenate needs at least one dataset")
    sizes = {d.image_size for d in datasets}
    if len(sizes) != 1:
        raise ValueError(f"cannot concatenate datasets with different image sizes {sorted(sizes)}")
    alphabets: list[str] = []
    alpha_index: dict[str, int] = {}
    char_alphabet, labels, offset = [], [], 0
    for d in datasets:
        for name_ in d.alphabets:
            if name_ not in alpha_index:
                alpha_index[name_] = len(alphabets)
                alphabets.append(name_)
        remap = np.array([alpha_index[a] for a in d.alphabets], dtype=np.int64)
        char_alphabet.append(remap[d.char_alphabet])
        labels.append(d.labels + offset)
        offset += d.num_classes
    return OmniglotDataset(
        images=np.concatenate([d.images for d in datasets]),
        labels=np.concatenate(labels),
        drawer=np.concatenate([d.drawer for d in datasets]),
        alphabets=alphabets,
        characters=[ch for d in datasets for ch in d.characters],
        char_alphabet=np.concatenate(char_alphabet),
        name=name if name is not None else "+".join(d.name for d in datasets),
    )


def split_by_alphabet(
    dataset: OmniglotDataset, names: Iterable[str]
) -> tuple[OmniglotDataset, OmniglotDataset]:
    """Split into (the named alphabets, all other alphabets) — the meta-learning split."""
    names = [names] if isinstance(names, str) else list(names)
    dataset._alphabet_ids(names)  # raise on unknown names before splitting
    rest = [a for a in dataset.alphabets if a not in names]
    return dataset.subset(alphabets=names), dataset.subset(alphabets=rest)


def split_by_character(
    dataset: OmniglotDataset, num_train: int, rng: RngLike = None
) -> tuple[OmniglotDataset, OmniglotDataset]:
    """Split characters at random into ``num_train`` training and the remaining test characters.

    This is the split of the MAML / prototypical-network papers (e.g. 1200 training characters
    of the full set); alphabets may then appear on both sides.
    """
    num_train = check_int("num_train", num_train, "split_by_character", 0, dataset.num_classes)
    perm = as_generator(rng).permutation(dataset.num_classes)
    train, test = np.sort(perm[:num_train]), np.sort(perm[num_train:])
    return dataset.subset(characters=train.tolist()), dataset.subset(characters=test.tolist())


def split_by_drawer(
    dataset: OmniglotDataset, train_drawers: Iterable[int] = range(1, 16)
) -> tuple[OmniglotDataset, OmniglotDataset]:
    """Split images by drawer into (train, test) sharing the same characters and labels.

    The default puts drawers 1-15 in train and 16-20 in test: a plain classification split.
    """
    train_drawers = set(int(d) for d in train_drawers)
    test_drawers = set(np.unique(dataset.drawer).tolist()) - train_drawers
    return dataset.subset(drawers=sorted(train_drawers)), dataset.subset(
        drawers=sorted(test_drawers)
    )
