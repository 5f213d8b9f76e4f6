"""``import tinymeta`` from a source checkout that was never installed (issue 11).

The installed package maps the top-level ``kernels/`` folder to ``tinymeta.kernels``; a plain
checkout on ``sys.path`` must work the same way. The child interpreter runs with ``-S`` (no site
processing, so no editable-install finder) and a ``sys.path`` of the repository root plus the
directory NumPy and Numba live in (added as a plain path: its ``.pth`` files are not run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SITE = str(Path(np.__file__).resolve().parents[1])

CHILD = """
import sys
sys.path[:0] = [{repo!r}, {site!r}]
import tinymeta as tm
import tinymeta.nn.functional as F
assert tm.__file__.startswith({repo!r}), tm.__file__
assert tm.kernels.__name__ == "tinymeta.kernels"
x = tm.tensor([1.0, -2.0, 3.0], requires_grad=True)
(g,) = tm.grad(F.relu(x).sum(), x)
print(g.numpy().tolist())
"""


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1", "TINYMETA_KERNELS": "numpy"}
    return subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_import_from_uninstalled_checkout(tmp_path):
    proc = _run(CHILD.format(repo=str(REPO), site=SITE), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[1.0, 0.0, 1.0]"


def test_missing_kernels_folder_says_to_install(tmp_path):
    # A copy of the package without the kernels/ folder beside it: a clear ImportError.
    import shutil

    shutil.copytree(
        REPO / "tinymeta", tmp_path / "tinymeta", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {SITE!r}]; import tinymeta"
    proc = _run(code, tmp_path)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "pip install -e ." in proc.stderr
    assert "circular import" not in proc.stderr
