"""Hypothesis profiles and the ``device`` parameter for the test suite.

``HYPOTHESIS_PROFILE=ci`` makes every run draw the same examples (derandomize)
and prints the blob that reproduces a failure; ``dev`` (the default) draws new
examples on every run. Neither has a deadline: the first call of an op can be
slow (NumPy/Numba warm-up, CuPy kernel compilation), which says nothing about
the code under test. ``ci-gpu`` is ``ci`` with a fifth of the examples and no
shrinking, for a time-boxed run of the cuda cases on a GPU machine (a GPU op
costs tens of microseconds of launch overhead where NumPy takes one, and the
first call of each kernel compiles it); a failure is reported as drawn.

A test that takes a ``device`` argument runs once per device: ``cpu`` always,
``cuda`` marked ``gpu`` and skipped (with the reason) where CuPy or a GPU is
missing. ``-m gpu`` selects the cuda cases, ``-m "not gpu"`` the rest.

The ``omniglot_archives`` fixture skips a test, saying how to provide them, where the
Omniglot background archives are not found (the library looks in ``$TINYMETA_DATA``).
"""

import os

import pytest
from hypothesis import Phase, settings

import tinymeta as tm

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, max_examples=25, database=None
)
settings.register_profile(
    "ci-gpu",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=5,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

HAVE_CUDA = tm.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not HAVE_CUDA, reason="needs CuPy and a CUDA GPU"),
        ],
    ),
]


def pytest_generate_tests(metafunc):
    # Direct parametrization (not a fixture), so that Hypothesis' @given tests can take it.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(scope="session")
def omniglot_archives():
    """The folder holding the small Omniglot background archives; skips without them."""
    from tinymeta.data import omniglot_root

    for stem in ("images_background_small1", "images_background_small2"):
        if not (omniglot_root() / f"{stem}.zip").is_file():
            pytest.skip(
                f"{stem}.zip not found under {omniglot_root()}: set TINYMETA_DATA to the folder "
                f"that holds it (to fetch it there: "
                f"`python -c \"import tinymeta.data as d; d.download_omniglot('{stem}', 'DIR')\"`)"
            )
    return omniglot_root()
