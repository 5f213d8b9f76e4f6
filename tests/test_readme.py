"""README's and docs/' Python snippets run as written (the docs must tell the truth).

A block fenced as ```python is run in a fresh interpreter; a block that is only an
excerpt (not meant to run alone) is fenced as ```py instead.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks():
    """(document name, block) for every ```python block, in document order."""
    return [
        (path.relative_to(ROOT).as_posix(), block)
        for path in DOCUMENTS
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    ]


def _omniglot_available() -> bool:
    from tinymeta.data import omniglot_root

    try:
        return (omniglot_root() / "images_background_small1.zip").is_file()
    except (FileNotFoundError, OSError):
        return False


_BLOCKS = _python_blocks()


@pytest.mark.parametrize(
    "document, block", _BLOCKS, ids=[f"{doc}-{i}" for i, (doc, _) in enumerate(_BLOCKS)]
)
def test_documented_python_block_runs(document, block, tmp_path):
    if "load_omniglot" in block and not _omniglot_available():
        pytest.skip("the Omniglot archives are not here (set TINYMETA_DATA to their folder)")
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"a block of {document} failed:\n{block}\n{result.stderr}"
