"""Array modules and devices.

Every op works on "an array module" ``xp``: NumPy on the CPU, CuPy on a GPU.
Code that needs an array function asks ``get_array_module(array)`` instead of
importing NumPy directly, so the same forward code serves both devices.
"""

from __future__ import annotations

import numbers

import numpy as np

_cupy = None
_cupy_checked = False
_cupy_problem = ""  # why CuPy is not usable, once checked


def cupy_or_none():
    """Import CuPy lazily (importing it is slow and it is optional); None unless it imports
    and sees a CUDA device (CuPy imports without a driver and fails on first use)."""
    global _cupy, _cupy_checked, _cupy_problem
    if not _cupy_checked:
        _cupy_checked = True
        _cupy, _cupy_problem = _usable_cupy()
    return _cupy


def _usable_cupy():
    """(cupy, "") where CuPy sees a CUDA device, else (None, why not)."""
    try:
        import cupy
    except Exception as e:  # not installed, or a broken install: the CPU still works
        return None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, a driver older than CuPy's CUDA, no device
        return None, f"CuPy {cupy.__version__} finds no usable CUDA GPU ({type(e).__name__}: {e})"
    if count < 1:
        return None, f"CuPy {cupy.__version__} finds no CUDA GPU"
    return cupy, ""


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
            f"device 'cuda' was requested but CuPy or a CUDA GPU is not available: "
            f"{_cupy_problem}. Install the extra (pip install 'tinymeta[cuda]'); CuPy needs a "
            "driver at least as recent as its CUDA version"
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


# --- dtype promotion ---------------------------------------------------------------------

# PyTorch's categories: a value of a higher category decides the kind of the result.
_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3}
# The dtype a Python number of each category brings when it outranks every tensor.
_SCALAR_DEFAULT = {
    0: np.dtype(np.bool_),
    1: np.dtype(np.int64),
    2: np.dtype(np.float32),
    3: np.dtype(np.complex64),
}


def _scalar_category(value) -> int:
    if isinstance(value, (bool, np.bool_)):
        return 0
    if isinstance(value, numbers.Integral):
        return 1
    if isinstance(value, numbers.Real):
        return 2
    return 3


def promoted_dtype(operands, true_divide: bool = False):
    """The result dtype of an elementwise op on ``operands``, by PyTorch's rule.

    Tensors and arrays decide by category (bool < integer < float < complex): the result takes
    the dtype of the highest category present, NumPy's rule within it (float32 with float64
    gives float64). A Python number (or NumPy scalar) counts only when its category is higher
    than every tensor's, and then brings the default dtype of its category: a float with an
    integer or bool tensor gives float32, an int with a bool tensor int64, an int with an int32
    tensor stays int32. ``true_divide``: an integer or bool result becomes float32, as a / b does
    in PyTorch. NumPy differs in both places (int64 * 2.5 and int64 / int64 give float64), so
    the op wrappers cast their integer operands to this dtype first.

    None when no operand has a numeric dtype (Python numbers only; lists are left to NumPy).
    """
    dtypes = [
        o.dtype for o in operands if not isinstance(o, numbers.Number) and hasattr(o, "dtype")
    ]
    if not dtypes or any(d.kind not in _CATEGORY for d in dtypes):
        return None  # strings, objects, datetimes: NumPy's error or rule, unchanged
    top = max(_CATEGORY[d.kind] for d in dtypes)
    dtype = np.result_type(*[d for d in dtypes if _CATEGORY[d.kind] == top])
    scalars = [_scalar_category(o) for o in operands if isinstance(o, numbers.Number)]
    if scalars and max(scalars) > top:
        dtype = _SCALAR_DEFAULT[max(scalars)]
    if true_divide and dtype.kind in "biu":
        dtype = _SCALAR_DEFAULT[2]
    return dtype


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the OS.

    For long CPU runs (examples, benchmarks); the library never calls it itself, since it
    changes the whole process. Why: every meta-iteration allocates and frees the same
    tens-of-megabytes arrays. By
    default glibc serves large ones with fresh ``mmap`` pages and trims its heap after frees,
    so each iteration pays for page faults on zeroed pages again; the task-vectorized
    meta-batch, whose arrays are T times larger, pays the most. Here every allocation comes
    from the heap, which never shrinks: the process keeps its peak memory. Same as running
    with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``. False (nothing done) where
    the C library is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
