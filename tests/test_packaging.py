"""The package as it ships: ``python -m build`` makes an sdist and a wheel (the wheel built
from the sdist), each installs into a fresh virtual environment, and works there.

The environments are made without pip and get their dependencies (NumPy, Numba, Pillow, tqdm)
from the test's own environment through a ``.pth`` line, so nothing is downloaded; tinymeta
itself comes only from the installed archive (the smoke test runs from an empty folder, with
``python -I``, and checks where every module it imports lives). Nothing is built with network
access: ``--no-isolation`` uses the setuptools of the test's environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tinymeta

REPO = Path(__file__).resolve().parents[1]
SITE = str(Path(np.__file__).resolve().parents[1])  # where the dependencies live

SMOKE = r"""
import importlib, importlib.metadata, pkgutil, sys
from importlib import resources
from pathlib import Path

import numpy as np
import tinymeta as tm

prefix = Path(sys.prefix).resolve()
assert Path(tm.__file__).resolve().is_relative_to(prefix), tm.__file__
assert tm.__version__ == importlib.metadata.version("tinymeta") == sys.argv[1], tm.__version__

# Every module of the package imports (optional dependencies aside) and was installed.
optional = {"cupy", "mpi4py", "gymnasium", "mujoco", "matplotlib", "torch"}
for info in pkgutil.walk_packages(tm.__path__, "tinymeta."):
    try:
        module = importlib.import_module(info.name)
    except ImportError as err:
        assert err.name and err.name.split(".")[0] in optional, (info.name, err)
        continue
    assert Path(module.__file__).resolve().is_relative_to(prefix), module.__file__

# A second-order gradient: d2/dx2 sum(x^3) = 6x.
x = tm.tensor([0.5, -1.0, 2.0], dtype=tm.float64, requires_grad=True)
(g,) = tm.grad((x**3).sum(), x, create_graph=True)
(h,) = tm.grad(g.sum(), x)
assert np.allclose(h.numpy(), 6 * x.numpy()), h

# The Numba kernels, as tinymeta.kernels, compiled and cached beside the installed module.
import tinymeta.kernels as K
assert K.__name__ == "tinymeta.kernels" and K.backend() == "numba", K.backend()
gy, a = np.linspace(-1, 1, 5000), np.linspace(-2, 1, 5000)  # big enough for the Numba loop
assert np.array_equal(K.relu_backward(gy, a), np.where(a > 0, gy, 0.0))
cache = Path(K.__file__).parent / "__pycache__"
assert any(cache.glob("numba_impl._relu_backward_flat*.nbi")), sorted(cache.iterdir())

# The CUDA kernels' sources ship beside their wrappers (compiled on a GPU's first use).
from tinymeta.kernels import cuda_impl
assert cuda_impl._ELEMENTWISE.path.is_file(), cuda_impl._ELEMENTWISE.path

# The viewer's template ships, and the viewer writes its page.
assert resources.files("tinymeta.viz").joinpath("viewer.html").is_file()
w = tm.tensor([1.0, 2.0], requires_grad=True)
page = tm.viz.html((w * w).sum(), Path.cwd() / "page.html")
assert "tm-step-counter" in page.read_text()
print("smoke test passed")
"""


def _source_modules() -> set[str]:
    """Every module file (and CUDA source) of the checkout, as a path inside the installed
    package."""
    files = {f"tinymeta/{p.relative_to(REPO / 'tinymeta')}" for p in (REPO / "tinymeta").rglob("*")}
    files |= {
        f"tinymeta/kernels/{p.relative_to(REPO / 'kernels')}" for p in (REPO / "kernels").rglob("*")
    }
    return {f for f in files if f.endswith((".py", ".html", ".cu")) and "__pycache__" not in f}


def _fresh_env(where: Path) -> Path:
    """A new virtual environment (no pip) that sees the dependencies but not the checkout."""
    venv.EnvBuilder(with_pip=False).create(where)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "dependencies.pth").write_text(SITE + "\n")
    return python


def _run(args, cwd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("NUMBA_CACHE_DIR", None)  # the kernels' cache must go beside the installed module
    env.update(TINYMETA_KERNELS="numba", PYTHONNOUSERSITE="1")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_sdist_and_wheel_install_and_work(tmp_path):
    pytest.importorskip("build", reason="needs the build package (pip install -e '.[test]')")
    dist = tmp_path / "dist"
    # The sdist from the checkout, then the wheel from the unpacked sdist (build's default).
    _run(
        [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
         "--outdir", str(dist), str(REPO)],
        cwd=tmp_path,
    )  # fmt: skip
    version = tinymeta.__version__
    (sdist,) = dist.glob(f"tinymeta-{version}.tar.gz")
    (wheel,) = dist.glob(f"tinymeta-{version}-py3-none-any.whl")

    # No file missing: every module and the template, the LICENSE and README in the sdist.
    wheel_files = set(zipfile.ZipFile(wheel).namelist())
    assert _source_modules() <= wheel_files, sorted(_source_modules() - wheel_files)
    assert any(f.endswith(".dist-info/METADATA") for f in wheel_files)
    with tarfile.open(sdist) as tar:
        sdist_files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "tinymeta/viz/viewer.html"} <= sdist_files
    assert "kernels/numba_impl.py" in sdist_files

    for name, archive in (("wheel", wheel), ("sdist", sdist)):
        python = _fresh_env(tmp_path / f"env-{name}")
        _run(
            [python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
             "--quiet", str(archive)],
            cwd=tmp_path,
            timeout=300,
        )  # fmt: skip
        workdir = tmp_path / f"run-{name}"
        workdir.mkdir()
        done = _run([python, "-I", "-c", SMOKE, version], cwd=workdir, timeout=300)
        assert "smoke test passed" in done.stdout


def test_version_is_written_once():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "tinymeta.__version__" }' in pyproject
    assert "\nversion =" not in pyproject.split("[tool.setuptools.dynamic]")[0]
    from importlib.metadata import version

    assert version("tinymeta") == tinymeta.__version__
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "tinymeta developers" in license_text
    assert 'license = { text = "MIT" }' in pyproject
