"""``tm.cuda``: is a GPU usable?"""

from tinymeta.backend import is_available

__all__ = ["is_available"]
