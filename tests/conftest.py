"""Hypothesis profiles for the test suite.

``HYPOTHESIS_PROFILE=ci`` makes every run draw the same examples (derandomize)
and prints the blob that reproduces a failure; ``dev`` (the default) draws new
examples on every run. Neither has a deadline: the first call of an op can be
slow (NumPy/Numba warm-up), which says nothing about the code under test.
"""

import os

from hypothesis import settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, max_examples=25, database=None
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
