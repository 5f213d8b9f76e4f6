"""Data for tinymeta's meta-learning examples: sinusoid tasks and Omniglot.

Everything here returns plain NumPy arrays (float32 inputs, int64 labels) and does not
depend on the tensor engine.
"""

from .dataset import (
    OmniglotDataset,
    concatenate,
    split_by_alphabet,
    split_by_character,
    split_by_drawer,
)
from .episodes import Episode, EpisodeIndices, EpisodeSampler
from .omniglot import (
    BACKGROUND_SETS,
    CHECKSUMS,
    ChecksumError,
    default_cache_dir,
    download_omniglot,
    load_omniglot,
    omniglot_root,
    read_archive,
)
from .oneshot_runs import OneShotRun, error_rate, load_oneshot_runs
from .sinusoid import SinusoidBatch, SinusoidTask, SinusoidTasks

__all__ = [
    "BACKGROUND_SETS",
    "CHECKSUMS",
    "ChecksumError",
    "Episode",
    "EpisodeIndices",
    "EpisodeSampler",
    "OmniglotDataset",
    "OneShotRun",
    "SinusoidBatch",
    "SinusoidTask",
    "SinusoidTasks",
    "concatenate",
    "default_cache_dir",
    "download_omniglot",
    "error_rate",
    "load_oneshot_runs",
    "load_omniglot",
    "omniglot_root",
    "read_archive",
    "split_by_alphabet",
    "split_by_character",
    "split_by_drawer",
]
