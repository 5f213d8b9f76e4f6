"""Array modules and devices.

Every op works on "an array module" ``xp``: NumPy on the CPU, CuPy on a GPU.
Code that needs an array function asks ``get_array_module(array)`` instead of
importing NumPy directly, so the same forward code serves both devices.
"""

from __future__ import annotations

import numpy as np

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """Import CuPy lazily (importing it is slow and it is optional)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            _cupy = cupy
        except Exception:  # no CuPy, no driver or no device: the CPU still works
            _cupy = None
    return _cupy


def get_array_module(array):
    """NumPy for host arrays (and scalars), CuPy for device arrays."""
    if isinstance(array, np.ndarray):
        return np
    cp = _cupy
    if cp is None and not _cupy_checked and is_cupy_array(array):
        cp = cupy_or_none()  # a CuPy array made before tinymeta first looked for CuPy
    return cp if cp is not None and isinstance(array, cp.ndarray) else np


def is_cupy_array(obj) -> bool:
    """Whether ``obj`` is a CuPy array (checked by type name: CuPy need not be imported)."""
    return type(obj).__module__.startswith("cupy")


def device_of(array) -> str:
    """``"cpu"`` or ``"cuda"`` for an array."""
    return "cpu" if get_array_module(array) is np else "cuda"


def array_module_for(device: str):
    """The array module that holds arrays for ``device``."""
    device = normalize_device(device)
    if device == "cpu":
        return np
    cp = cupy_or_none()
    if cp is None:
        raise RuntimeError(
            "device 'cuda' was requested but CuPy or a CUDA GPU is not available "
            "(install the extra: pip install 'tinymeta[cuda]')"
        )
    return cp


def normalize_device(device) -> str:
    if device is None:
        return "cpu"
    name = str(device).split(":")[0]
    if name in ("cpu", "cuda", "gpu"):
        return "cuda" if name == "gpu" else name
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def move_array(array, device: str):
    """Copy ``array`` to ``device`` (no copy when it is already there)."""
    device = normalize_device(device)
    if device_of(array) == device:
        return array
    if device == "cpu":
        return to_numpy(array)
    return array_module_for("cuda").asarray(array)


def to_numpy(array) -> np.ndarray:
    """``array`` as a NumPy array: a device array is copied to the host."""
    if isinstance(array, np.ndarray):
        return array
    cp = cupy_or_none()
    return cp.asnumpy(array) if cp is not None else np.asarray(array)


def is_available() -> bool:
    """Whether CuPy and at least one CUDA device are usable."""
    return cupy_or_none() is not None
