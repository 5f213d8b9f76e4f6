"""tm.save / tm.load: round trips of nested state, key escaping, and files that
are truncated, malformed or hostile (never unpickled, always a clear ValueError)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

import tinymeta as tm
import tinymeta.nn as nn
from tinymeta.serialization import MANIFEST


def _state():
    return {
        "model": {"0.weight": tm.tensor(np.arange(6, dtype=np.float32).reshape(2, 3))},
        "grad_leaf": tm.tensor([1.0, 2.0], dtype=tm.float64, requires_grad=True),
        "array": np.arange(4, dtype=np.int32),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "flags": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "empty": np.zeros((0, 3)),
        "np_scalar": np.float32(2.5),
        "np_int": np.int64(-3),
        "step": 12,
        "big": 2**80,
        "lr": 0.1,
        "nan": float("nan"),
        "inf": float("-inf"),
        "flag": True,
        "z": 1 - 1j,
        "name": "run/1.é",
        "nothing": None,
        "optimizer": {
            "state": {0: {"exp_avg": np.ones(2, np.float32), "step": 3}},
            "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "lr": 1e-3}],
        },
    }


def _assert_same(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, tm.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.requires_grad == b.requires_grad, where
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=where)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, where


def test_round_trip_preserves_structure_types_dtypes_and_shapes(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = _state()
    tm.save(state, path)
    assert path.exists() and not (tmp_path / "ckpt.pt.npz").exists()  # no suffix added
    loaded = tm.load(path)
    _assert_same(state, loaded)
    assert loaded["grad_leaf"].requires_grad and loaded["grad_leaf"].is_leaf
    assert loaded["array"].flags.writeable


def test_the_file_is_a_plain_npz_with_dotted_escaped_member_names(tmp_path):
    path = tmp_path / "ckpt.npz"
    tm.save(
        {"model": {"0.weight": tm.ones(2)}, "a/b\\c%": np.zeros(1), "opt": {1: np.ones(1)}}, path
    )
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        np.testing.assert_array_equal(npz["model.0%2Eweight"], [1, 1])
    assert names == {"model.0%2Eweight", "a%2Fb%5Cc%25", "opt.1", MANIFEST}
    manifest = json.loads(zipfile.ZipFile(path).read(MANIFEST))
    assert manifest["format"] == "tinymeta.save" and manifest["version"] == 1


def test_keys_with_dots_separators_and_odd_characters_round_trip(tmp_path):
    # Any string key survives: the manifest keeps the exact keys, members are escaped.
    state = {
        "a.b": {"c": np.ones(1)},
        "a": {"b.c": np.zeros(1), "": np.full(1, 2.0)},
        "../../etc": np.ones(2),
        "\x00ctl\n": 1,
        "%2E": np.ones(3),
        ".": np.ones(4),
    }
    path = tmp_path / "keys"
    tm.save(state, path)
    _assert_same(state, tm.load(path))
    for name in zipfile.ZipFile(path).namelist():
        assert "/" not in name and ".." not in name.split(".npy")[0].replace("%2E", "")


def test_module_and_optimizer_style_checkpoint(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    model(tm.randn(2, 1, 3, 3))  # update the running stats
    path = tmp_path / "model.npz"
    tm.save({"model": model.state_dict(), "epoch": 3}, path)
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    ckpt = tm.load(path)
    other.load_state_dict(ckpt["model"])
    assert ckpt["epoch"] == 3
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    assert other[1].num_batches_tracked.item() == 1


def test_save_rejects_what_it_cannot_store(tmp_path):
    path = tmp_path / "x"
    with pytest.raises(TypeError, match="state must be a dict"):
        tm.save([1, 2], path)
    with pytest.raises(TypeError, match=r"state\['a'\] has dtype object"):
        tm.save({"a": np.array([{}, 1], dtype=object)}, path)
    with pytest.raises(TypeError, match=r"cannot save state\['f'\] of type function"):
        tm.save({"f": lambda: 0}, path)
    with pytest.raises(TypeError, match="keys must be str or int"):
        tm.save({(1, 2): 3}, path)
    with pytest.raises(ValueError, match="both map to the member name '1'"):
        tm.save({1: np.ones(1), "1": np.ones(1)}, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


# --- hostile and broken files ------------------------------------------------------------------


def _zip(path, members: dict, compressed=()):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            kind = zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=kind)
    return path


def _npy(array, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _manifest(root) -> bytes:
    return json.dumps({"format": "tinymeta.save", "version": 1, "root": root}).encode()


def _array_root(kind="array", member="x"):
    return {"type": "dict", "items": [{"key": "x", "key_type": "str",
                                       "value": {"type": kind, "member": member}}]}  # fmt: skip


class Sentinel:
    """Unpickling this would set ``ran``: the test proves load never unpickles."""

    ran = False

    def __reduce__(self):
        return (Sentinel._trip, ())

    @staticmethod
    def _trip():
        Sentinel.ran = True
        return "pwned"


def test_valid_hand_made_file_loads(tmp_path):
    path = _zip(tmp_path / "ok", {MANIFEST: _manifest(_array_root()), "x.npy": _npy(np.ones(2))})
    np.testing.assert_array_equal(tm.load(path)["x"], [1, 1])


def _corrupt_cases(tmp_path):
    good = _npy(np.arange(4.0))
    object_npy = _npy(np.array([Sentinel(), 1], dtype=object), allow_pickle=True)
    header_only = good[: len(good) - 8]  # truncated data
    buf = io.BytesIO()  # a header that asks for 8 TB, followed by 32 bytes
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
    )
    lying = buf.getvalue() + bytes(32)
    return {
        "not a zip": (tmp_path / "a", b"hello, I am not a checkpoint"),
        "pickle file": (tmp_path / "b", pickle.dumps({"x": Sentinel()})),
        "empty file": (tmp_path / "c", b""),
        "no manifest": _zip(tmp_path / "d", {"x.npy": good}),
        "manifest not json": _zip(tmp_path / "e", {MANIFEST: b"{not json", "x.npy": good}),
        "manifest wrong format": _zip(
            tmp_path / "f", {MANIFEST: json.dumps({"format": "other"}).encode()}
        ),
        "object array (pickled)": _zip(
            tmp_path / "g", {MANIFEST: _manifest(_array_root()), "x.npy": object_npy}
        ),
        "truncated member": _zip(
            tmp_path / "h", {MANIFEST: _manifest(_array_root()), "x.npy": header_only}
        ),
        "lying header": _zip(tmp_path / "i", {MANIFEST: _manifest(_array_root()), "x.npy": lying}),
        "missing member": _zip(tmp_path / "j", {MANIFEST: _manifest(_array_root())}),
        "member not npy": _zip(
            tmp_path / "k", {MANIFEST: _manifest(_array_root()), "x.npy": b"garbage bytes"}
        ),
        "unknown node type": _zip(
            tmp_path / "l", {MANIFEST: _manifest(_array_root(kind="pickle")), "x.npy": good}
        ),
        "stray member": _zip(
            tmp_path / "m",
            {MANIFEST: _manifest(_array_root()), "x.npy": good, "evil.pkl": pickle.dumps(1)},
        ),
        "compressed member": _zip(
            tmp_path / "n",
            {MANIFEST: _manifest(_array_root()), "x.npy": good},
            compressed=("x.npy",),
        ),
        "root not a dict": _zip(tmp_path / "o", {MANIFEST: _manifest({"type": "int", "value": 1})}),
        "wrong scalar type": _zip(
            tmp_path / "p",
            {
                MANIFEST: _manifest(
                    {
                        "type": "dict",
                        "items": [
                            {"key": "x", "key_type": "str", "value": {"type": "int", "value": "1"}}
                        ],
                    }
                )
            },
        ),  # fmt: skip
        "numpy scalar not 0-d": _zip(
            tmp_path / "q", {MANIFEST: _manifest(_array_root(kind="numpy_scalar")), "x.npy": good}
        ),
        "deep nesting": _zip(
            tmp_path / "r", {MANIFEST: b'{"root":' + b"[" * 100000 + b"]" * 100000 + b"}"}
        ),
        "bad key type": _zip(
            tmp_path / "s",
            {
                MANIFEST: _manifest(
                    {
                        "type": "dict",
                        "items": [{"key": 1, "key_type": "float", "value": {"type": "none"}}],
                    }
                )
            },
        ),  # fmt: skip
        "member used twice": _zip(
            tmp_path / "t",
            {
                MANIFEST: _manifest(
                    {
                        "type": "dict",
                        "items": [
                            {
                                "key": "a",
                                "key_type": "str",
                                "value": {"type": "array", "member": "x"},
                            },
                            {
                                "key": "b",
                                "key_type": "str",
                                "value": {"type": "array", "member": "x"},
                            },
                        ],
                    }
                ),
                "x.npy": good,
            },
        ),  # fmt: skip
    }


def test_broken_and_hostile_files_raise_value_error_naming_the_path(tmp_path):
    cases = _corrupt_cases(tmp_path)
    for what, entry in cases.items():
        if isinstance(entry, tuple):
            path, data = entry
            path.write_bytes(data)
        else:
            path = entry
        with pytest.raises(
            ValueError, match="tm.load: .* (is )?not a valid checkpoint|nested"
        ) as info:
            tm.load(path)
        assert str(path) in str(info.value), what
    assert not Sentinel.ran


def test_truncated_checkpoint_at_every_length_raises_value_error(tmp_path):
    path = tmp_path / "full"
    tm.save({"w": tm.ones(3, 4), "b": np.zeros(2), "n": 1}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut"
    for n in list(range(0, len(data), max(1, len(data) // 60))) + [len(data) - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="tm.load"):
            tm.load(cut)


def test_bit_flips_never_crash_with_other_errors(tmp_path):
    path = tmp_path / "full"
    tm.save({"w": tm.ones(3, 4), "meta": {"step": 2, "name": "x"}}, path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    bad = tmp_path / "flipped"
    for _ in range(60):
        flipped = bytearray(data)
        for i in rng.integers(0, len(data), 3):
            flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            tm.load(bad)  # a flip inside array data can still load: values are not checked
        except ValueError as e:
            assert "tm.load" in str(e)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="tm.load: no such file"):
        tm.load(tmp_path / "nope.npz")
