"""Tests for tinymeta.data: sinusoid tasks, Omniglot loading/caching/splits, episodes, runs.

The Omniglot archives are found through ``omniglot_root()``: set ``$TINYMETA_DATA`` to the
folder that holds ``images_background_small1.zip`` (``.ci/run`` does when the data folder is
beside the checkout); tests that need them skip, saying so, when they are absent. small1 is
decoded once per module into a temporary cache; the network is never used.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tinymeta.data.omniglot as omniglot_mod
from tinymeta.data import (
    CHECKSUMS,
    ChecksumError,
    EpisodeSampler,
    OmniglotDataset,
    SinusoidTask,
    SinusoidTasks,
    download_omniglot,
    error_rate,
    load_omniglot,
    load_oneshot_runs,
    omniglot_root,
    split_by_alphabet,
    split_by_character,
    split_by_drawer,
)

SMALL1_NAME = "images_background_small1"
SMALL1_ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
SMALL1_CHARS_PER_ALPHABET = [24, 22, 24, 40, 26]


def _archive(stem: str) -> Path:
    return omniglot_root() / f"{stem}.zip"


def _require(stem: str) -> Path:
    path = _archive(stem)
    if not path.is_file():
        pytest.skip(
            f"Omniglot archive {path.name} not found under {path.parent}: set TINYMETA_DATA to "
            f"the folder that holds it (to fetch it there: "
            f"`python -c \"import tinymeta.data as d; d.download_omniglot('{stem}', 'DIR')\"`)"
        )
    return path


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep every load in this module out of the user's real cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMETA_CACHE", str(tmp_path_factory.mktemp("default-cache")))
        yield


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def small1(cache_dir) -> OmniglotDataset:
    _require(SMALL1_NAME)
    return load_omniglot("small1", cache_dir=cache_dir)


class _DecodeCounter:
    """Wraps the PNG decoder to count calls (a cache hit must not decode anything)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = omniglot_mod.decode_image

        def counting(data: bytes, image_size: int) -> np.ndarray:
            self.calls += 1
            return real(data, image_size)

        monkeypatch.setattr(omniglot_mod, "decode_image", counting)


def _assert_same(a: OmniglotDataset, b: OmniglotDataset) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.drawer, b.drawer)
    np.testing.assert_array_equal(a.char_alphabet, b.char_alphabet)
    assert a.alphabets == b.alphabets and a.characters == b.characters


# ----------------------------------------------------------------------------- sinusoid


def test_sinusoid_batch_shapes_ranges_and_values():
    batch = SinusoidTasks(rng=0).sample_batch(8, 5, 10)
    xs, ys, xq, yq = batch  # unpacks like a tuple
    assert xs.shape == ys.shape == (8, 5, 1) and xq.shape == yq.shape == (8, 10, 1)
    assert all(a.dtype == np.float32 for a in (xs, ys, xq, yq))
    assert np.all((xs >= -5) & (xs <= 5)) and np.all((xq >= -5) & (xq <= 5))
    assert np.all((batch.amplitudes >= 0.1) & (batch.amplitudes <= 5.0))
    assert np.all((batch.phases >= 0) & (batch.phases <= np.pi))
    amp, ph = batch.amplitudes[:, None, None], batch.phases[:, None, None]
    np.testing.assert_allclose(ys, amp * np.sin(xs - ph), atol=1e-5)
    np.testing.assert_allclose(yq, amp * np.sin(xq - ph), atol=1e-5)
    # The targets are exactly the true function of the returned inputs.
    task = SinusoidTask(float(batch.amplitudes[2]), float(batch.phases[2]))
    np.testing.assert_array_equal(task(xq[2]), yq[2])
    assert len(batch) == 8


def test_sinusoid_seeded_is_deterministic():
    a, b, c = SinusoidTasks(rng=3), SinusoidTasks(rng=3), SinusoidTasks(rng=4)
    for u, v in zip(a.sample_batch(4, 5, 5), b.sample_batch(4, 5, 5), strict=True):
        np.testing.assert_array_equal(u, v)
    ta, tb = a.sample_task(), b.sample_task()
    assert (ta.amplitude, ta.phase) == (tb.amplitude, tb.phase)
    for u, v in zip(ta.sample(7), tb.sample(7), strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(
        SinusoidTasks(rng=3).sample_batch(4, 5, 5).xs, c.sample_batch(4, 5, 5).xs
    )


def test_sinusoid_task_sample_and_call():
    tasks = SinusoidTasks(amplitude=(2.0, 2.0), phase=(0.5, 0.5), x_range=(0, 1), rng=1)
    task = tasks.sample_task()
    assert task.amplitude == 2.0 and task.phase == 0.5
    x, y = task.sample(6)
    assert x.shape == y.shape == (6, 1) and x.dtype == y.dtype == np.float32
    assert np.all((x >= 0) & (x <= 1))
    np.testing.assert_allclose(y, 2.0 * np.sin(x - 0.5), atol=1e-6)
    np.testing.assert_array_equal(task(x), y)
    # An explicit generator overrides the task's own stream and is reproducible.
    np.testing.assert_array_equal(task.sample(3, rng=9)[0], task.sample(3, rng=9)[0])


def test_sinusoid_validation():
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidTasks(amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="k_support"):
        SinusoidTasks(rng=0).sample_batch(2, -1, 3)
    with pytest.raises(TypeError, match="rng"):
        SinusoidTasks(rng="seed")
    batch = SinusoidTasks(rng=0).sample_batch(2, 0, 3)
    assert batch.xs.shape == (2, 0, 1) and batch.xq.shape == (2, 3, 1)


# ----------------------------------------------------------------------------- root resolution


def test_omniglot_root_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYMETA_DATA", raising=False)
    assert omniglot_root(tmp_path / "explicit") == tmp_path / "explicit"

    monkeypatch.setenv("TINYMETA_DATA", str(tmp_path))
    assert omniglot_root() == tmp_path  # the variable may name the Omniglot folder itself...
    (tmp_path / "omniglot").mkdir()
    assert omniglot_root() == tmp_path / "omniglot"  # ...or a data folder holding omniglot/
    assert omniglot_root(tmp_path / "explicit") == tmp_path / "explicit"

    # Without TINYMETA_DATA: the cache's omniglot/ folder, where downloads go.
    monkeypatch.delenv("TINYMETA_DATA")
    monkeypatch.setenv("TINYMETA_CACHE", str(tmp_path / "cache"))
    assert omniglot_root() == tmp_path / "cache" / "omniglot"
    monkeypatch.delenv("TINYMETA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert omniglot_root() == tmp_path / "xdg" / "tinymeta" / "omniglot"


def test_data_is_found_only_through_root_env_or_cache(monkeypatch, tmp_path):
    """No folder next to the source checkout is ever looked at."""
    for name in ("TINYMETA_DATA", "TINYMETA_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert omniglot_root() == tmp_path / "home" / ".cache" / "tinymeta" / "omniglot"
    source = Path(omniglot_mod.__file__).read_text()
    assert '"shared"' not in source and "../shared" not in source


# ----------------------------------------------------------------------------- loading


def test_small1_contents(small1):
    d = small1
    assert len(d) == 2720 and d.num_classes == 136 and d.alphabets == SMALL1_ALPHABETS
    assert d.images.shape == (2720, 1, 28, 28) and d.images.dtype == np.float32
    assert d.labels.dtype == d.drawer.dtype == d.char_alphabet.dtype == np.int64
    assert d.images.min() == 0.0 and d.images.max() == 1.0
    # Ink = 1 on a zero background: sparse strokes, empty borders.
    assert d.images.mean() < 0.2
    assert d.images[..., 0, :].mean() < 0.02 and d.images[..., :, -1].mean() < 0.02
    np.testing.assert_array_equal(np.bincount(d.labels), np.full(136, 20))
    np.testing.assert_array_equal(np.bincount(d.char_alphabet), SMALL1_CHARS_PER_ALPHABET)
    # Every character has exactly drawers 1..20.
    pairs = d.labels * 100 + d.drawer
    assert len(np.unique(pairs)) == 2720 and set(d.drawer.tolist()) == set(range(1, 21))
    assert d.characters[0] == ("Balinese", "character01")
    assert d.characters[-1] == ("Latin", "character26")
    assert all(d.alphabets[d.char_alphabet[i]] == a for i, (a, _) in enumerate(d.characters))


def test_small2_and_union(small1, cache_dir):
    _require("images_background_small2")
    small2 = load_omniglot("small2", cache_dir=cache_dir)
    # The brief's 163 disagrees with the archive: 24 + 47 + 26 + 42 + 17 = 156 = 3120 / 20.
    assert len(small2) == 3120 and small2.num_classes == 156 and small2.num_alphabets == 5

    # Greek and Latin are the same images in both archives, which is why "both" keeps one copy.
    for alphabet in ("Greek", "Latin"):
        np.testing.assert_array_equal(
            small1.subset(alphabets=[alphabet]).images, small2.subset(alphabets=[alphabet]).images
        )

    both = load_omniglot("both", cache_dir=cache_dir)
    assert both.num_classes == 242 and both.num_alphabets == 8 and len(both) == 242 * 20
    assert len(set(both.characters)) == 242
    assert sorted(both.alphabets) == sorted(set(small1.alphabets) | set(small2.alphabets))
    np.testing.assert_array_equal(np.bincount(both.labels), np.full(242, 20))
    _assert_same(both.subset(alphabets=small1.alphabets), small1)


def test_cache_hit_skips_decoding_and_is_identical(tmp_path, monkeypatch):
    _require(SMALL1_NAME)
    counter = _DecodeCounter(monkeypatch)
    first = load_omniglot("small1", cache_dir=tmp_path)
    assert counter.calls == 2720
    (cache_file,) = tmp_path.glob("*.npz")
    assert SMALL1_NAME in cache_file.name and "28px" in cache_file.name
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file behind

    second = load_omniglot("small1", cache_dir=tmp_path)
    assert counter.calls == 2720  # no decode on the second load
    _assert_same(first, second)

    uncached = load_omniglot("small1", cache=False)
    assert counter.calls == 2 * 2720
    _assert_same(first, uncached)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return 0


class _Evil:
    def __reduce__(self):
        return (_record_unpickling, ())


def _hostile_object_array(path: Path, valid: Path) -> None:
    np.savez(path, ink=np.array([_Evil()], dtype=object), labels=np.zeros(1, dtype=np.int64))


def _hostile_garbage(path: Path, valid: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is not a valid npz file")


def _hostile_wrong_shape(path: Path, valid: Path) -> None:
    with np.load(valid, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["ink"] = arrays["ink"][:10]  # truncated images, metadata left as is
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "make_hostile", [_hostile_object_array, _hostile_garbage, _hostile_wrong_shape]
)
def test_unusable_cache_is_rejected_and_rebuilt(
    small1, cache_dir, tmp_path, monkeypatch, make_hostile
):
    archive = _require(SMALL1_NAME)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    valid = omniglot_mod._cache_path(cache_dir, SMALL1_NAME, 28, sha)
    assert valid.is_file()
    target = omniglot_mod._cache_path(tmp_path, SMALL1_NAME, 28, sha)
    make_hostile(target, valid)

    counter = _DecodeCounter(monkeypatch)
    with pytest.warns(UserWarning, match="unusable Omniglot cache"):
        rebuilt = load_omniglot("small1", cache_dir=tmp_path)
    assert not _UNPICKLED, "the cache loader unpickled an object array"
    assert counter.calls == 2720
    _assert_same(rebuilt, small1)
    with np.load(target, allow_pickle=False) as npz:  # replaced by a clean cache
        assert npz["ink"].dtype == np.uint8 and npz["ink"].shape == (2720, 28, 28)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_omniglot("full", root=tmp_path, cache=False)
    message = str(info.value)
    assert str(tmp_path / "images_background.zip") in message and "download=True" in message
    with pytest.raises(ValueError, match="background must be one of"):
        load_omniglot("small3", root=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_omniglot("small1", image_size=0)


def test_image_size_option(small1, tmp_path):
    _require(SMALL1_NAME)
    big = load_omniglot("small1", image_size=105, cache=False)
    assert big.images.shape == (2720, 1, 105, 105)
    # Unresized originals are 1-bit, so they hold only 0 and 1.
    assert set(np.unique(big.images).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(big.labels, small1.labels)


# ----------------------------------------------------------------------------- download


class _FakeUrlopen:
    """Stands in for urllib.request.urlopen, serving fixed bytes and recording URLs."""

    def __init__(self, payload: bytes | Exception) -> None:
        self.payload = payload
        self.urls: list[str] = []

    def __call__(self, url, timeout=None):
        self.urls.append(url)
        if isinstance(self.payload, Exception):
            raise self.payload
        return io.BytesIO(self.payload)


def _patch_urlopen(monkeypatch, payload) -> _FakeUrlopen:
    fake = _FakeUrlopen(payload)
    monkeypatch.setattr(omniglot_mod.urllib.request, "urlopen", fake)
    return fake


def test_download_verifies_published_sha256(monkeypatch, tmp_path):
    archive = _require(SMALL1_NAME)
    payload = archive.read_bytes()
    fake = _patch_urlopen(monkeypatch, payload)
    path = download_omniglot(SMALL1_NAME, tmp_path)
    assert path == tmp_path / f"{SMALL1_NAME}.zip" and path.read_bytes() == payload
    assert fake.urls == [
        f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{SMALL1_NAME}.zip"
    ]
    # A verified archive already in place is reused without touching the network.
    fake.payload = RuntimeError("network must not be used")
    assert download_omniglot(f"{SMALL1_NAME}.zip", tmp_path) == path


def test_download_checksum_mismatch_deletes_partial_file(monkeypatch, tmp_path):
    _patch_urlopen(monkeypatch, b"not the omniglot archive")
    with pytest.raises(ChecksumError, match="sha256"):
        download_omniglot(SMALL1_NAME, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a partial file remains


def test_download_md5_logic_with_fake_archive(monkeypatch, tmp_path):
    fake_zip = b"pretend this is images_background.zip"
    _patch_urlopen(monkeypatch, fake_zip)
    with pytest.raises(ChecksumError, match="68d2efa1b9178cc56df9314c21c6e718"):
        download_omniglot("images_background", tmp_path)
    assert list(tmp_path.iterdir()) == []

    good = ("md5", hashlib.md5(fake_zip).hexdigest())
    monkeypatch.setitem(omniglot_mod.CHECKSUMS, "images_background", good)
    path = download_omniglot("images_background", tmp_path)
    assert path.read_bytes() == fake_zip and list(tmp_path.iterdir()) == [path]


def test_download_errors(monkeypatch, tmp_path):
    _patch_urlopen(monkeypatch, urllib.error.URLError("no route to host"))
    with pytest.raises(OSError, match="could not download .*no route to host"):
        download_omniglot("images_evaluation", tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown Omniglot archive"):
        download_omniglot("images_whatever", tmp_path)
    assert set(CHECKSUMS) >= {"images_background", "images_evaluation", SMALL1_NAME}


def test_load_downloads_missing_archive_only_when_asked(small1, cache_dir, monkeypatch, tmp_path):
    archive = _require(SMALL1_NAME)
    fake = _patch_urlopen(monkeypatch, archive.read_bytes())
    with pytest.raises(FileNotFoundError):
        load_omniglot("small1", root=tmp_path, cache_dir=cache_dir)
    assert fake.urls == []
    loaded = load_omniglot("small1", root=tmp_path, cache_dir=cache_dir, download=True)
    assert len(fake.urls) == 1 and (tmp_path / f"{SMALL1_NAME}.zip").is_file()
    _assert_same(loaded, small1)


def test_download_falls_back_to_user_folder_when_root_is_read_only(
    small1, cache_dir, monkeypatch, tmp_path
):
    archive = _require(SMALL1_NAME)
    read_only, cache = tmp_path / "data", tmp_path / "cache"
    read_only.mkdir()
    monkeypatch.setenv("TINYMETA_DATA", str(read_only))
    monkeypatch.setenv("TINYMETA_CACHE", str(cache))
    real_writable = omniglot_mod._writable
    monkeypatch.setattr(omniglot_mod, "_writable", lambda d: d != read_only and real_writable(d))
    fake = _patch_urlopen(monkeypatch, archive.read_bytes())
    load_omniglot("small1", cache_dir=cache_dir, download=True)
    assert (cache / "omniglot" / f"{SMALL1_NAME}.zip").is_file()
    assert not list(read_only.iterdir())
    # The next load finds the downloaded copy without the network.
    fake.payload = RuntimeError("network must not be used")
    _assert_same(load_omniglot("small1", cache_dir=cache_dir), small1)


# ----------------------------------------------------------------------------- splits


def test_subset_by_alphabet_relabels(small1):
    sub = small1.subset(alphabets=["Latin", "Korean"])
    assert sub.alphabets == ["Korean", "Latin"]  # original order is kept
    assert sub.num_classes == 66 and len(sub) == 66 * 20
    np.testing.assert_array_equal(np.unique(sub.labels), np.arange(66))
    mask = np.isin(small1.image_alphabet, [3, 4])
    np.testing.assert_array_equal(sub.images, small1.images[mask])
    assert [sub.characters[c] for c in sub.labels] == [
        small1.characters[c] for c in small1.labels[mask]
    ]
    np.testing.assert_array_equal(np.bincount(sub.char_alphabet), [40, 26])
    with pytest.raises(KeyError, match="Klingon"):
        small1.subset(alphabets=["Klingon"])


def test_split_by_alphabet(small1):
    train, test = split_by_alphabet(small1, ["Greek", "Latin"])
    assert train.alphabets == ["Greek", "Latin"]
    assert test.alphabets == ["Balinese", "Early_Aramaic", "Korean"]
    assert len(train) + len(test) == len(small1)
    assert not set(train.characters) & set(test.characters)


def test_split_by_drawer_keeps_label_space(small1):
    train, test = split_by_drawer(small1, range(1, 16))
    assert len(train) == 136 * 15 and len(test) == 136 * 5
    assert set(train.drawer.tolist()) == set(range(1, 16))
    assert set(test.drawer.tolist()) == set(range(16, 21))
    assert train.characters == test.characters == small1.characters
    np.testing.assert_array_equal(train.labels, small1.labels[small1.drawer <= 15])
    np.testing.assert_array_equal(test.images, small1.images[small1.drawer > 15])


def test_character_filters(small1):
    train, test = split_by_character(small1, 100, rng=0)
    again, _ = split_by_character(small1, 100, rng=0)
    assert train.num_classes == 100 and test.num_classes == 36
    assert train.characters == again.characters
    assert not set(train.characters) & set(test.characters)
    sub = small1.subset(characters=[("Greek", "character03"), 0])
    assert sub.characters == [("Balinese", "character01"), ("Greek", "character03")]
    assert len(sub) == 40
    sub = small1.subset(characters=[0, 1, 2], drawers=[1, 2])
    assert len(sub) == 6 and sub.num_classes == 3
    with pytest.raises(IndexError):
        small1.subset(characters=[500])


# ----------------------------------------------------------------------------- episodes


def test_episode_shapes_and_labels(small1):
    ep = EpisodeSampler(small1, ways=5, shots=2, queries=3, rng=0).sample()
    assert ep.support_x.shape == (10, 1, 28, 28) and ep.query_x.shape == (15, 1, 28, 28)
    assert ep.support_x.dtype == ep.query_x.dtype == np.float32
    assert ep.support_y.dtype == ep.query_y.dtype == np.int64
    np.testing.assert_array_equal(ep.support_y, np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(ep.query_y, np.repeat(np.arange(5), 3))

    batch = EpisodeSampler(small1, ways=5, shots=1, queries=4, rng=0).sample_batch(3)
    assert batch.support_x.shape == (3, 5, 1, 28, 28) and batch.query_y.shape == (3, 20)
    sequential = EpisodeSampler(small1, ways=5, shots=1, queries=4, rng=0)
    for t in range(3):
        ep = sequential.sample()
        np.testing.assert_array_equal(batch.query_x[t], ep.query_x)


def test_episode_class_structure(small1):
    sampler = EpisodeSampler(small1, ways=20, shots=5, queries=15, rng=1)
    for _ in range(20):
        idx = sampler.sample_indices()
        assert len(np.unique(idx.classes)) == 20
        for c, sup, qry in zip(idx.classes, idx.support, idx.query, strict=True):
            assert np.all(small1.labels[sup] == c) and np.all(small1.labels[qry] == c)
            assert len(np.unique(np.concatenate([sup, qry]))) == 20  # all distinct
    ep = EpisodeSampler(small1, ways=5, shots=1, queries=2, rng=5).sample()
    idx = EpisodeSampler(small1, ways=5, shots=1, queries=2, rng=5).sample_indices()
    np.testing.assert_array_equal(ep.support_x, small1.images[idx.support.ravel()])
    np.testing.assert_array_equal(ep.query_x, small1.images[idx.query.ravel()])


def test_episode_seeding(small1):
    a = EpisodeSampler(small1, 5, 1, 5, rng=42).sample_batch(4)
    b = EpisodeSampler(small1, 5, 1, 5, rng=42).sample_batch(4)
    c = EpisodeSampler(small1, 5, 1, 5, rng=43).sample_batch(4)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.support_x, c.support_x)


def test_episode_rotations(small1):
    sampler = EpisodeSampler(small1, ways=10, shots=1, queries=1, rng=2, rotations=True)
    assert sampler.num_classes == 4 * 136
    seen = set()
    for _ in range(10):
        idx = sampler.sample_indices()
        seen.update(idx.rotations.tolist())
        assert len(set(zip(idx.classes.tolist(), idx.rotations.tolist(), strict=True))) == 10
    assert seen == {0, 1, 2, 3}

    replay = EpisodeSampler(small1, ways=10, shots=1, queries=1, rng=7, rotations=True)
    idx = replay.sample_indices()
    ep = EpisodeSampler(small1, ways=10, shots=1, queries=1, rng=7, rotations=True).sample()
    for i, k in enumerate(idx.rotations):
        expected = np.rot90(small1.images[idx.support[i, 0]], k=k, axes=(-2, -1))
        np.testing.assert_array_equal(ep.support_x[i], expected)


def test_episode_flips_are_mirror_classes(small1):
    sampler = EpisodeSampler(small1, ways=20, shots=1, queries=1, rng=4, rotations=True, flips=True)
    assert sampler.num_classes == 8 * 136
    seen = set()
    for _ in range(10):
        idx = sampler.sample_indices()
        views = list(zip(idx.classes.tolist(), idx.rotations.tolist(), idx.flipped.tolist()))
        assert len(set(views)) == 20  # a character and its mirror image are different classes
        seen.update(idx.flipped.tolist())
    assert seen == {False, True}

    idx = EpisodeSampler(small1, 20, 1, 1, rng=9, rotations=True, flips=True).sample_indices()
    ep = EpisodeSampler(small1, 20, 1, 1, rng=9, rotations=True, flips=True).sample()
    for i in range(20):
        image = small1.images[idx.query[i, 0]]
        if idx.flipped[i]:
            image = image[..., ::-1]  # mirror first, then turn
        expected = np.rot90(image, k=idx.rotations[i], axes=(-2, -1))
        np.testing.assert_array_equal(ep.query_x[i], expected)
    # Without flips nothing changes, the random stream included.
    plain = EpisodeSampler(small1, 5, 1, 1, rng=3, rotations=True).sample_batch(2)
    again = EpisodeSampler(small1, 5, 1, 1, rng=3, rotations=True, flips=False).sample_batch(2)
    np.testing.assert_array_equal(plain.support_x, again.support_x)
    assert EpisodeSampler(small1, 5, 1, 1, rng=3).sample_indices().flipped is None


def test_episode_shifts_move_each_image_within_range(small1):
    shifted = EpisodeSampler(small1, ways=20, shots=2, queries=3, rng=6, max_shift=3)
    idx = EpisodeSampler(small1, ways=20, shots=2, queries=3, rng=6).sample_indices()
    ep = shifted.sample()
    originals = small1.images[idx.support.ravel()][:, 0]
    offsets = set()
    for original, moved in zip(originals, ep.support_x[:, 0], strict=True):
        matches = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                expected = np.zeros_like(original)
                src = original[max(0, -dy) : 28 - max(0, dy), max(0, -dx) : 28 - max(0, dx)]
                expected[max(0, dy) : 28 + min(0, dy), max(0, dx) : 28 + min(0, dx)] = src
                if np.array_equal(moved, expected):
                    matches.append((dy, dx))
        assert matches, "a shifted image is not a shift of its original by at most 3 pixels"
        offsets.update(matches)
    assert len(offsets) > 5  # offsets are drawn per image
    with pytest.raises(ValueError, match="max_shift"):
        EpisodeSampler(small1, 5, 1, 1, max_shift=28)
    with pytest.raises(ValueError, match="max_shift"):
        EpisodeSampler(small1, 5, 1, 1, max_shift=-1)


def test_episode_same_alphabet(small1):
    sampler = EpisodeSampler(small1, ways=20, shots=1, queries=1, rng=3, same_alphabet=True)
    alphabets = set()
    for _ in range(30):
        idx = sampler.sample_indices()
        episode_alphabets = set(small1.char_alphabet[idx.classes].tolist())
        assert len(episode_alphabets) == 1
        alphabets |= episode_alphabets
    assert len(alphabets) > 1
    # Only Korean (40 characters) can host a 30-way episode; nothing can host 41 ways.
    korean = EpisodeSampler(small1, ways=30, shots=1, queries=1, rng=0, same_alphabet=True)
    assert set(small1.char_alphabet[korean.sample_indices().classes].tolist()) == {3}
    with pytest.raises(ValueError, match="no alphabet"):
        EpisodeSampler(small1, ways=41, shots=1, queries=1, same_alphabet=True)


def test_episode_sampler_validation(small1):
    with pytest.raises(ValueError, match="137-way"):
        EpisodeSampler(small1, ways=137, shots=1, queries=1)
    with pytest.raises(ValueError):
        EpisodeSampler(small1, ways=5, shots=10, queries=11)  # only 20 images per character
    with pytest.raises(ValueError, match="shots"):
        EpisodeSampler(small1, ways=5, shots=0, queries=1)


# ----------------------------------------------------------------------------- one-shot runs


def _raw_png_names(archive: Path) -> dict[tuple[str, str, int], str]:
    """(alphabet, character, drawer) -> PNG name inside the zip."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
    out = {}
    for name in names:
        alphabet, character, filename = name.split("/")[-3:]
        out[(alphabet, character, int(filename[:-4].split("_")[1]))] = name
    return out


@pytest.fixture(scope="module")
def fake_runs(small1, tmp_path_factory):
    """Three 20-way runs in the official layout, built from small1's raw PNGs.

    Returns (folder of run folders, expected dataset indices per run as
    (train indices, test indices, test labels)).
    """
    archive = _require(SMALL1_NAME)
    names = _raw_png_names(archive)
    rng = np.random.default_rng(0)
    base = tmp_path_factory.mktemp("runs")
    runs_dir = base / "all_runs"
    expected = []
    with zipfile.ZipFile(archive) as zf, zipfile.ZipFile(base / "all_runs.zip", "w") as out:
        for r, alphabet in enumerate(["Korean", "Balinese", "Latin"], start=1):
            run = f"run{r:02d}"
            chars = [c for c in range(small1.num_classes) if small1.characters[c][0] == alphabet]
            chars = chars[:20]
            answers = rng.permutation(20)  # test item i shows class answers[i]
            files, lines = {}, []
            for j, c in enumerate(chars):
                files[f"{run}/training/class{j + 1:02d}.png"] = names[(*small1.characters[c], 1)]
            for i, j in enumerate(answers):
                c = chars[j]
                files[f"{run}/test/item{i + 1:02d}.png"] = names[(*small1.characters[c], 2)]
                lines.append(f"{run}/test/item{i + 1:02d}.png {run}/training/class{j + 1:02d}.png")
            lines = [lines[i] for i in rng.permutation(20)]  # reader must not rely on line order
            files[f"{run}/class_labels.txt"] = None
            for rel, src in files.items():
                data = ("\r\n".join(lines) + "\r\n").encode() if src is None else zf.read(src)
                (runs_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (runs_dir / rel).write_bytes(data)
                out.writestr(rel, data)
            index = {
                (c, d): i for i, (c, d) in enumerate(zip(small1.labels, small1.drawer, strict=True))
            }
            train_idx = [index[(c, 1)] for c in chars]
            test_idx = [index[(chars[j], 2)] for j in answers]
            expected.append((train_idx, test_idx, answers))
    return base, expected


def _check_runs(runs, small1, expected):
    assert [run.name for run in runs] == ["run01", "run02", "run03"]
    for run, (train_idx, test_idx, answers) in zip(runs, expected, strict=True):
        assert run.train_x.shape == run.test_x.shape == (20, 1, 28, 28)
        assert run.train_x.dtype == np.float32 and run.test_y.dtype == np.int64
        np.testing.assert_array_equal(run.train_y, np.arange(20))
        np.testing.assert_array_equal(run.test_y, answers)
        # Same preprocessing as the dataset: bit-identical images.
        np.testing.assert_array_equal(run.train_x, small1.images[train_idx])
        np.testing.assert_array_equal(run.test_x, small1.images[test_idx])


def test_oneshot_runs_from_folder_and_zip(small1, fake_runs):
    base, expected = fake_runs
    _check_runs(load_oneshot_runs(base / "all_runs"), small1, expected)
    _check_runs(load_oneshot_runs(base / "all_runs.zip"), small1, expected)
    zip_only = base / "zip_only"
    zip_only.mkdir(exist_ok=True)
    (zip_only / "all_runs.zip").write_bytes((base / "all_runs.zip").read_bytes())
    _check_runs(load_oneshot_runs(zip_only), small1, expected)


def test_error_rate(fake_runs):
    runs = load_oneshot_runs(fake_runs[0] / "all_runs.zip")
    perfect = [run.test_y for run in runs]
    assert error_rate(perfect, runs) == 0.0
    assert error_rate([(y + 1) % 20 for y in perfect], runs) == 1.0
    some_wrong = [y.copy() for y in perfect]
    some_wrong[1][:6] = (some_wrong[1][:6] + 1) % 20
    assert error_rate(np.stack(some_wrong), runs) == pytest.approx(6 / 60)
    with pytest.raises(ValueError, match="runs"):
        error_rate(perfect[:2], runs)
    with pytest.raises(ValueError, match="expected 20 predictions"):
        error_rate([y[:5] for y in perfect], runs)

    # Usage example: 1-nearest-neighbour on pixels beats chance (19/20 wrong) by a margin.
    nearest = []
    for run in runs:
        d = ((run.test_x[:, None] - run.train_x[None]) ** 2).sum(axis=(2, 3, 4))
        nearest.append(d.argmin(axis=1))
    assert error_rate(nearest, runs) < 0.85


def test_oneshot_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_oneshot_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="class_labels.txt"):
        load_oneshot_runs(tmp_path)
    run = tmp_path / "run01"
    (run / "training").mkdir(parents=True)
    (run / "class_labels.txt").write_text("run01/test/item01.png\n")
    with pytest.raises(ValueError, match="expected"):
        load_oneshot_runs(tmp_path)
    (run / "class_labels.txt").write_text("run01/test/item01.png run01/training/class01.png\n")
    with pytest.raises(FileNotFoundError, match="item01.png"):
        load_oneshot_runs(tmp_path)
