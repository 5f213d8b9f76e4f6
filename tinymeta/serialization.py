"""``tm.save`` / ``tm.load``: checkpoints as ``.npz`` files that never unpickle.

A checkpoint is a zip archive (``np.load`` opens it) of

- one ``.npy`` member per tensor, array or NumPy scalar, named by its path in
  the saved dict, keys joined with ``.`` (``{"model": {"w": t}}`` -> ``model.w``);
- ``__manifest__.json``, which records the whole structure: which members are
  tensors (and whether they required grad), which are arrays, and the Python
  scalars, strings and None in place (JSON keeps ints exact and floats
  round-trip through repr).

Key escaping: inside one key, ``%``, ``.``, ``/``, ``\\`` and control
characters are percent-encoded (``"0.weight"`` -> ``0%2Eweight``), so the
dotted member names are unique, and no member name can step outside a folder
when someone unzips the file. Loading never parses member names: the
manifest holds the exact keys, so any string key round-trips.

What can be saved: a dict (str or int keys) of tensors, arrays and NumPy
scalars of bool/int/float/complex dtype, Python bool/int/float/complex/str,
None, and nested dicts, lists and tuples of those (an optimizer's
``state_dict()`` included). Loading returns the same structure: tensors as
cpu Tensors, arrays as NumPy arrays, scalars as the same Python or NumPy type.

Loading reads only ``.npy`` headers (literal dicts), raw numeric bytes and
JSON: it never unpickles and never runs code from the file. Object arrays,
pickled content, compressed members (a decompression bomb needs compression),
sizes that do not match the header, unknown node types or stray members all
raise a ValueError that names the file.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from tinymeta import backend
from tinymeta.tensor import Tensor

__all__ = ["load", "save"]

MANIFEST = "__manifest__.json"
FORMAT = "tinymeta.save"
VERSION = 1
_NUMERIC_KINDS = "biufc"
_MAX_MANIFEST_BYTES = 64 * 2**20
_ESCAPED = {"%", ".", "/", "\\"}


def _escape(key) -> str:
    """One key as a member-name component: % . / \\ and control characters percent-encoded."""
    return "".join(
        f"%{ord(ch):02X}" if ch in _ESCAPED or ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in str(key)
    )


def _where(keys: list) -> str:
    return "the root" if not keys else "state" + "".join(f"[{k!r}]" for k in keys)


# --- saving ----------------------------------------------------------------------------------


def _array_node(kind: str, array, keys: list, members: dict, **extra) -> dict:
    array = backend.to_numpy(array)
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"tm.save: {_where(keys)} has dtype {array.dtype}; only bool, integer, float and "
            "complex arrays can be saved"
        )
    name = ".".join(_escape(k) for k in keys)
    if name in members:
        raise ValueError(
            f"tm.save: {_where(keys)} and another entry both map to the member name {name!r} "
            "(an int key and a str key with the same text?)"
        )
    members[name] = array
    return {"type": kind, "member": name, **extra}


def _encode(value, keys: list, members: dict) -> dict:
    """The manifest node for ``value``; arrays go into ``members``."""
    if isinstance(value, Tensor):
        return _array_node("tensor", value.data, keys, members, requires_grad=value.requires_grad)
    if isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__"):
        return _array_node("array", value, keys, members)
    if isinstance(value, np.generic):
        return _array_node("numpy_scalar", np.asarray(value), keys, members)
    if value is None:
        return {"type": "none"}
    if isinstance(value, bool):  # before int: bool is an int subclass
        return {"type": "bool", "value": value}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, complex):
        return {"type": "complex", "value": [value.real, value.imag]}
    if isinstance(value, str):
        return {"type": "str", "value": value}
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(
                    f"tm.save: {_where(keys)} has a key {k!r} of type {type(k).__name__}; "
                    "keys must be str or int"
                )
            key_type = "str" if isinstance(k, str) else "int"
            items.append({"key": k, "key_type": key_type, "value": _encode(v, keys + [k], members)})
        return {"type": "dict", "items": items}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {
            "type": kind,
            "items": [_encode(v, keys + [i], members) for i, v in enumerate(value)],
        }
    raise TypeError(
        f"tm.save: cannot save {_where(keys)} of type {type(value).__name__}; expected tensors, "
        "arrays, Python scalars, strings, None, or dicts/lists/tuples of them"
    )


def save(state: dict, path) -> None:
    """Write ``state`` (a possibly nested dict of tensors, arrays and scalars) to ``path``.

    The file is an ``.npz`` archive plus a JSON manifest (see the module
    docstring); ``path`` is used as given (no suffix is added). The archive is
    written to a temporary file and renamed, so an interrupted save never
    leaves a half-written checkpoint under ``path``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"tm.save: state must be a dict, got {type(state).__name__}")
    path = os.fspath(path)
    members: dict = {}
    root = _encode(state, [], members)
    manifest = json.dumps({"format": FORMAT, "version": VERSION, "root": root}).encode("utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(MANIFEST, manifest)
            for name, array in members.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --- loading ---------------------------------------------------------------------------------


class _Corrupt(Exception):
    """Why a file is not a valid checkpoint (turned into a ValueError naming the file)."""


def _read_npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """A numeric array from one ``.npy`` member, without ever unpickling."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Corrupt(f"member {info.filename!r} is compressed; tm.save stores members as is")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise _Corrupt(f"member {info.filename!r} has unsupported .npy version {version}")
        if dtype.hasobject or dtype.fields is not None or dtype.kind not in _NUMERIC_KINDS:
            raise _Corrupt(
                f"member {info.filename!r} has dtype {dtype}; only numeric arrays are loaded "
                "(never objects or pickled data)"
            )
        count = 1
        for n in shape:
            count *= int(n)
        nbytes = count * dtype.itemsize
        # The header promises nbytes; the zip directory says how many follow. Check before
        # allocating, so a lying header cannot ask for terabytes.
        available = info.file_size - f.tell()
        if available != nbytes:
            raise _Corrupt(
                f"member {info.filename!r} declares shape {shape} of {dtype} ({nbytes} bytes) "
                f"but holds {available} bytes of data"
            )
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise _Corrupt(f"member {info.filename!r} is truncated")
    array = np.frombuffer(bytearray(data), dtype=dtype)  # bytearray: a writable array
    return array.reshape(shape, order="F" if fortran else "C")


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise _Corrupt(f"malformed manifest: {what}")


class _Decoder:
    def __init__(self, zf: zipfile.ZipFile, infos: dict):
        self.zf, self.infos, self.used = zf, infos, set()

    def array(self, node: dict) -> np.ndarray:
        name = node.get("member")
        _expect(isinstance(name, str), f"a {node['type']} node has no member name")
        info = self.infos.get(name + ".npy")
        if info is None:
            raise _Corrupt(f"member {name + '.npy'!r} named by the manifest is missing")
        if name in self.used:
            raise _Corrupt(f"member {name + '.npy'!r} is used twice")
        self.used.add(name)
        return _read_npy(self.zf, info)

    def decode(self, node):
        _expect(isinstance(node, dict) and isinstance(node.get("type"), str), "node is not a dict")
        kind = node["type"]
        if kind == "tensor":
            array = self.array(node)
            requires_grad = node.get("requires_grad", False)
            _expect(isinstance(requires_grad, bool), "requires_grad is not a bool")
            _expect(
                not requires_grad or array.dtype.kind in "fc", "an integer tensor requires grad"
            )
            return Tensor(array, requires_grad=requires_grad)
        if kind == "array":
            return self.array(node)
        if kind == "numpy_scalar":
            array = self.array(node)
            _expect(array.ndim == 0, "a numpy_scalar member is not 0-d")
            return array[()]
        if kind == "none":
            return None
        if kind in ("bool", "int", "float", "str", "complex"):
            _expect("value" in node, f"a {kind} node has no value")
            return self.scalar(kind, node["value"])
        if kind == "dict":
            items = node.get("items")
            _expect(isinstance(items, list), "dict items are not a list")
            out = {}
            for item in items:
                _expect(isinstance(item, dict), "a dict item is not an object")
                key, key_type = item.get("key"), item.get("key_type")
                if key_type == "str":
                    _expect(isinstance(key, str), "a str key is not a string")
                elif key_type == "int":
                    _expect(isinstance(key, int) and not isinstance(key, bool), "bad int key")
                else:
                    raise _Corrupt(f"malformed manifest: unknown key_type {key_type!r}")
                out[key] = self.decode(item.get("value"))
            return out
        if kind in ("list", "tuple"):
            items = node.get("items")
            _expect(isinstance(items, list), f"{kind} items are not a list")
            values = [self.decode(v) for v in items]
            return values if kind == "list" else tuple(values)
        raise _Corrupt(f"malformed manifest: unknown node type {kind!r}")

    @staticmethod
    def scalar(kind: str, value):
        if kind == "bool":
            _expect(isinstance(value, bool), "a bool value is not true/false")
            return value
        if kind == "int":
            _expect(
                isinstance(value, int) and not isinstance(value, bool),
                "an int value is not an integer",
            )
            return value
        if kind == "float":
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool), "bad float")
            return float(value)
        if kind == "complex":
            _expect(
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                "a complex is not [real, imag]",
            )
            return complex(value[0], value[1])
        _expect(isinstance(value, str), "a str value is not a string")
        return value


def _load(zf: zipfile.ZipFile):
    infos = {}
    for info in zf.infolist():
        if info.filename in infos:
            raise _Corrupt(f"member {info.filename!r} appears twice")
        infos[info.filename] = info
    info = infos.pop(MANIFEST, None)
    if info is None:
        raise _Corrupt(f"no {MANIFEST} member: not a file written by tm.save")
    if info.file_size > _MAX_MANIFEST_BYTES or info.compress_type != zipfile.ZIP_STORED:
        raise _Corrupt(f"{MANIFEST} is too large or compressed")
    try:
        manifest = json.loads(zf.read(info).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Corrupt(f"{MANIFEST} is not valid JSON ({e})") from None
    _expect(isinstance(manifest, dict), "not a JSON object")
    if manifest.get("format") != FORMAT:
        raise _Corrupt(f"{MANIFEST} does not describe a tm.save checkpoint")
    if manifest.get("version") != VERSION:
        raise _Corrupt(f"unsupported checkpoint version {manifest.get('version')!r}")
    decoder = _Decoder(zf, infos)
    state = decoder.decode(manifest.get("root"))
    _expect(isinstance(state, dict), "the root is not a dict")
    stray = sorted(set(infos) - {name + ".npy" for name in decoder.used})
    if stray:
        raise _Corrupt(f"members not described by the manifest: {', '.join(stray[:5])}")
    return state


def load(path) -> dict:
    """Read a checkpoint written by ``tm.save``; returns the saved (nested) dict.

    Tensors come back as cpu Tensors (``requires_grad`` as saved), arrays as
    NumPy arrays, scalars and strings as themselves. Never unpickles: a
    truncated, malformed or hostile file raises ValueError naming ``path``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tm.load: no such file: {path!r}")
    try:
        with zipfile.ZipFile(path) as zf:
            return _load(zf)
    except _Corrupt as e:
        raise ValueError(f"tm.load: {path!r} is not a valid checkpoint: {e}") from None
    except PermissionError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        OSError,
        ValueError,
        TypeError,
    ) as e:
        # BadZipFile: not a zip, truncated, or a CRC mismatch; ValueError/TypeError: a bad
        # .npy header (NumPy parses it as a literal, never as code).
        raise ValueError(
            f"tm.load: {path!r} is not a valid checkpoint (truncated or corrupt): "
            f"{type(e).__name__}: {e}"
        ) from None
    except RecursionError:
        raise ValueError(
            f"tm.load: {path!r} is not a valid checkpoint: the manifest is nested too deeply"
        ) from None
