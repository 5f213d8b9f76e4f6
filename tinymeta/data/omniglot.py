"""Omniglot archives: locating, downloading, decoding and caching.

The zips are read in place with :mod:`zipfile` (never extracted) and each PNG is decoded with
Pillow (see :mod:`tinymeta.data._image` for the preprocessing). Decoding a background set
takes a second or more, so the compact result (``uint8`` ink images plus metadata) is cached
as an ``.npz`` keyed by archive name, image size and the archive's sha256; later loads only
read that file. The cache is loaded with ``allow_pickle=False`` and validated; anything odd
is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from ._image import RESAMPLE_NAME, check_image_size, decode_image, ink_to_float
from .dataset import OmniglotDataset, concatenate

BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"

#: ``load_omniglot(background=...)`` value -> archive stems whose union it loads.
BACKGROUND_SETS: dict[str, tuple[str, ...]] = {
    "small1": ("images_background_small1",),
    "small2": ("images_background_small2",),
    "both": ("images_background_small1", "images_background_small2"),
    "full": ("images_background",),
    "evaluation": ("images_evaluation",),
}

#: Archive stem -> (hash algorithm, hex digest) of the published zip.
CHECKSUMS: dict[str, tuple[str, str]] = {
    "images_background": ("md5", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": ("md5", "6b91aef0f799c5bb55b94e3f2daec811"),
    "images_background_small1": (
        "sha256",
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    ),
    "images_background_small2": (
        "sha256",
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    ),
}

CACHE_FORMAT_VERSION = 1
_CACHE_KEYS = frozenset(
    {
        "ink",
        "labels",
        "drawer",
        "alphabets",
        "char_folders",
        "char_alphabet",
        "source_sha256",
        "format_version",
    }
)


class ChecksumError(OSError):
    """A downloaded archive does not match its published checksum."""


# ----------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """The cache: ``$TINYMETA_CACHE``, else ``$XDG_CACHE_HOME/tinymeta`` (``~/.cache/tinymeta``).

    Decoded arrays are cached here, and archives are downloaded to its ``omniglot/`` folder.
    """
    env = os.environ.get("TINYMETA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tinymeta"


def _user_omniglot_dir() -> Path:
    return default_cache_dir() / "omniglot"


def omniglot_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the directory that holds the Omniglot zips.

    Order: the explicit ``root``; ``$TINYMETA_DATA`` (a data folder holding ``omniglot/``, or
    the Omniglot folder itself); finally the cache's ``omniglot/`` folder
    (``$TINYMETA_CACHE/omniglot``, by default ``~/.cache/tinymeta/omniglot``), where
    checksummed downloads go.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("TINYMETA_DATA")
    if env:
        base = Path(env).expanduser()
        return base / "omniglot" if (base / "omniglot").is_dir() else base
    return _user_omniglot_dir()


# ----------------------------------------------------------------------------- download


def _stem(name: str) -> str:
    stem = name[: -len(".zip")] if name.endswith(".zip") else name
    if stem not in CHECKSUMS:
        raise ValueError(f"unknown Omniglot archive {name!r}; known archives: {sorted(CHECKSUMS)}")
    return stem


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_omniglot(
    name: str, dest: str | os.PathLike[str] | None = None, *, timeout: float = 60.0
) -> Path:
    """Download ``<name>.zip`` from the official Omniglot repository into ``dest``.

    ``name`` is an archive stem such as ``"images_background_small1"`` (see ``CHECKSUMS``);
    ``dest`` defaults to :func:`omniglot_root`, or the cache's ``omniglot/`` folder when that
    is read-only (``load_omniglot`` looks there too). The file is streamed to a temporary name,
    its checksum verified, then renamed into place, so an interrupted or corrupt download
    never leaves a plausible-looking archive behind. An existing archive with the right
    checksum is reused. Raises :class:`ChecksumError` on mismatch and ``OSError`` when the
    download fails.
    """
    stem = _stem(name)
    algorithm, expected = CHECKSUMS[stem]
    dest_dir = _download_dir(_archive_dirs(None)) if dest is None else Path(dest).expanduser()
    target = dest_dir / f"{stem}.zip"
    if target.is_file() and _file_digest(target, algorithm) == expected:
        return target

    dest_dir.mkdir(parents=True, exist_ok=True)
    url = f"{BASE_URL}{stem}.zip"
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{stem}-", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.URLError as exc:
                raise OSError(f"could not download {url}: {exc}") from exc
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumError(
                f"downloaded {url} has {algorithm} {actual}, expected {expected}; "
                "the partial file was deleted, try again"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the archive is public data
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # no-op after a successful os.replace
    return target


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (or it can be created)."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return os.access(directory, os.W_OK)


def _download_dir(dirs: list[Path]) -> Path:
    return next((d for d in dirs if _writable(d)), dirs[0])


def _archive_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    """Folders searched for archives: the resolved root and, unless ``root`` was given, the
    cache's download folder (an archive downloaded there because the resolved root is
    read-only, e.g. a data folder holding only the small sets, must be found next time)."""
    dirs = [omniglot_root(root)]
    if root is None and _user_omniglot_dir() != dirs[0]:
        dirs.append(_user_omniglot_dir())
    return dirs


def _locate_archive(dirs: list[Path], stem: str, download: bool) -> Path:
    for directory in dirs:
        if (directory / f"{stem}.zip").is_file():
            return directory / f"{stem}.zip"
    if download:
        return download_omniglot(stem, _download_dir(dirs))
    looked = ", ".join(str(d / f"{stem}.zip") for d in dirs)
    raise FileNotFoundError(
        f"Omniglot archive {stem}.zip not found: looked for {looked}. Pass download=True "
        f"(fetches {BASE_URL}{stem}.zip), call download_omniglot({stem!r}, dest), or point "
        "root= / $TINYMETA_DATA at the folder that holds the zip."
    )


# ----------------------------------------------------------------------------- decoding


def _parse_drawer(filename: str) -> int:
    """Drawer id from ``<image id>_<drawer>.png`` (e.g. ``0108_07.png`` -> 7)."""
    try:
        return int(PurePosixPath(filename).stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"cannot parse a drawer id from {filename!r}") from None


def read_archive(path: str | os.PathLike[str], image_size: int = 28) -> dict[str, np.ndarray]:
    """Decode every PNG of an Omniglot zip into compact arrays (no caching).

    Returns ``ink`` (uint8 ``(N, S, S)``, ink = 255), ``labels``, ``drawer`` (int64 ``(N,)``),
    ``alphabets`` and ``char_folders`` (str arrays) and ``char_alphabet`` (int64 ``(C,)``).
    Alphabets, characters and drawers are sorted, so the order is independent of the zip's.
    """
    image_size = check_image_size(image_size)
    with zipfile.ZipFile(path) as zf:
        entries = []
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            # Skip folders and macOS resource-fork junk ("__MACOSX/", "._x.png").
            if info.is_dir() or not parts[-1].lower().endswith(".png") or "__MACOSX" in parts:
                continue
            if parts[-1].startswith("._"):
                continue
            if len(parts) < 3:
                raise ValueError(f"{path}: {info.filename} is not <alphabet>/<character>/<png>")
            alphabet, folder, filename = parts[-3:]
            entries.append((alphabet, folder, _parse_drawer(filename), filename, info))
        if not entries:
            raise ValueError(f"{path} holds no PNG images")
        entries.sort(key=lambda e: e[:4])

        alphabets = sorted({e[0] for e in entries})
        characters = sorted({(e[0], e[1]) for e in entries})
        char_index = {ch: i for i, ch in enumerate(characters)}
        alpha_index = {a: i for i, a in enumerate(alphabets)}
        ink = np.empty((len(entries), image_size, image_size), dtype=np.uint8)
        for i, entry in enumerate(entries):
            ink[i] = decode_image(zf.read(entry[4]), image_size)

    return {
        "ink": ink,
        "labels": np.array([char_index[(e[0], e[1])] for e in entries], dtype=np.int64),
        "drawer": np.array([e[2] for e in entries], dtype=np.int64),
        "alphabets": np.array(alphabets, dtype=np.str_),
        "char_folders": np.array([f for _, f in characters], dtype=np.str_),
        "char_alphabet": np.array([alpha_index[a] for a, _ in characters], dtype=np.int64),
    }


# ----------------------------------------------------------------------------- cache


def _cache_path(cache_dir: Path, stem: str, image_size: int, sha256: str) -> Path:
    name = f"omniglot-{stem}-{image_size}px-{RESAMPLE_NAME}-{sha256[:16]}-v{CACHE_FORMAT_VERSION}"
    return cache_dir / f"{name}.npz"


def _check_cached(arrays: dict[str, np.ndarray], sha256: str, image_size: int) -> None:
    """Raise ``ValueError`` unless ``arrays`` is a well-formed cache for this archive."""
    if set(arrays) != _CACHE_KEYS:
        raise ValueError(f"unexpected keys {sorted(arrays)}")
    version = int(arrays["format_version"])
    if str(arrays["source_sha256"]) != sha256 or version != CACHE_FORMAT_VERSION:
        raise ValueError("stale cache (different archive or format version)")
    ink, labels, drawer = arrays["ink"], arrays["labels"], arrays["drawer"]
    n, c = len(labels), len(arrays["char_folders"])
    if ink.dtype != np.uint8 or ink.shape != (n, image_size, image_size):
        raise ValueError(f"bad ink array {ink.dtype} {ink.shape}")
    for key in ("labels", "drawer", "char_alphabet"):
        arr = arrays[key]
        if arr.dtype != np.int64 or arr.shape != ((c,) if key == "char_alphabet" else (n,)):
            raise ValueError(f"bad {key} array {arr.dtype} {arr.shape}")
    for key in ("alphabets", "char_folders"):
        if arrays[key].dtype.kind != "U" or arrays[key].ndim != 1:
            raise ValueError(f"bad {key} array {arrays[key].dtype}")
    char_alphabet = arrays["char_alphabet"]
    if n and (labels.min() < 0 or labels.max() >= c or drawer.min() < 0):
        raise ValueError("labels or drawers out of range")
    if c and (char_alphabet.min() < 0 or char_alphabet.max() >= len(arrays["alphabets"])):
        raise ValueError("char_alphabet out of range")


def _read_cache(path: Path, sha256: str, image_size: int) -> dict[str, np.ndarray] | None:
    """Load a cache file, or return ``None`` (with a warning if it existed but was unusable)."""
    if not path.is_file():
        return None
    try:
        # allow_pickle=False: object arrays (which would unpickle arbitrary code) raise here.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        _check_cached(arrays, sha256, image_size)
    except Exception as exc:  # any unreadable or hostile cache is simply rebuilt
        warnings.warn(f"ignoring unusable Omniglot cache {path}: {exc}", stacklevel=4)
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + ``os.replace``) so readers never see a partial file."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared between users
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache dir should not stop the load
        warnings.warn(f"could not write Omniglot cache {path}: {exc}", stacklevel=4)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _load_archive_arrays(
    archive: Path, image_size: int, cache_dir: Path | None
) -> dict[str, np.ndarray]:
    sha256 = _file_digest(archive, "sha256")
    stem = archive.name[: -len(".zip")]
    cache_file = None if cache_dir is None else _cache_path(cache_dir, stem, image_size, sha256)
    if cache_file is not None:
        cached = _read_cache(cache_file, sha256, image_size)
        if cached is not None:
            return cached
    arrays = read_archive(archive, image_size)
    arrays["source_sha256"] = np.array(sha256, dtype=np.str_)
    arrays["format_version"] = np.array(CACHE_FORMAT_VERSION, dtype=np.int64)
    if cache_file is not None:
        _write_cache(cache_file, arrays)
    return arrays


def _to_dataset(arrays: dict[str, np.ndarray], name: str) -> OmniglotDataset:
    alphabets = [str(a) for a in arrays["alphabets"]]
    char_alphabet = arrays["char_alphabet"]
    characters = [
        (alphabets[a], str(f))
        for a, f in zip(char_alphabet.tolist(), arrays["char_folders"], strict=True)
    ]
    return OmniglotDataset(
        images=ink_to_float(arrays["ink"]),
        labels=arrays["labels"],
        drawer=arrays["drawer"],
        alphabets=alphabets,
        characters=characters,
        char_alphabet=char_alphabet,
        name=name,
    )


# ----------------------------------------------------------------------------- public loader


def load_omniglot(
    background: str = "small1",
    root: str | os.PathLike[str] | None = None,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    *,
    cache: bool = True,
) -> OmniglotDataset:
    """Load an Omniglot set as an :class:`OmniglotDataset` (float32 images, ink = 1).

    Args:
        background: ``"small1"`` / ``"small2"`` (the five-alphabet background sets),
            ``"both"`` (their union; Greek and Latin, present in both with identical images,
            are kept once, from small1), ``"full"`` (``images_background.zip``, 30 alphabets)
            or ``"evaluation"`` (``images_evaluation.zip``, 20 alphabets).
        root: folder holding the zips; by default :func:`omniglot_root`, then the cache's
            download folder (``$TINYMETA_CACHE/omniglot``, ``~/.cache/tinymeta/omniglot``).
        image_size: side of the square output images (105 keeps the originals unresized).
        cache_dir: where decoded arrays are cached; see :func:`default_cache_dir`.
        download: fetch a missing archive (checksum-verified) instead of raising.
        cache: set ``False`` to neither read nor write the cache.

    Raises:
        FileNotFoundError: an archive is missing and ``download`` is false.
    """
    if background not in BACKGROUND_SETS:
        raise ValueError(f"background must be one of {sorted(BACKGROUND_SETS)}, got {background!r}")
    image_size = check_image_size(image_size)
    archive_dirs = _archive_dirs(root)
    cache_root = None
    if cache:
        cache_root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()

    parts = []
    for stem in BACKGROUND_SETS[background]:
        archive = _locate_archive(archive_dirs, stem, download)
        parts.append(_to_dataset(_load_archive_arrays(archive, image_size, cache_root), stem))

    if len(parts) == 1:
        return parts[0]
    # Union by alphabet name: an alphabet already loaded (Greek, Latin) is not added twice.
    kept, seen = [parts[0]], set(parts[0].alphabets)
    for part in parts[1:]:
        new_alphabets = [a for a in part.alphabets if a not in seen]
        seen.update(new_alphabets)
        kept.append(part.subset(alphabets=new_alphabets))
    return concatenate(kept, name=background)
