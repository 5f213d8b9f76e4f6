"""tinymeta.backend helpers that act on the process rather than on arrays."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_sets_malloc_options_in_a_fresh_process():
    """Run in a child process: the setting lasts for the whole process. With glibc, both
    mallopt calls succeed and the heap keeps a freed 64 MB block (RSS does not drop back)."""
    code = (
        "import resource, numpy as np\n"
        "from tinymeta.backend import keep_freed_memory\n"
        "ok = keep_freed_memory()\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
        "a = np.ones(16 * 2**20, dtype=np.float32); a += 1; del a\n"
        "print(ok, rss() > 60 * 2**20)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
