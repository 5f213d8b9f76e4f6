"""README's Python snippets run as written (the README must tell the truth)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _omniglot_available() -> bool:
    from tinymeta.data import omniglot_root

    try:
        return (omniglot_root() / "images_background_small1.zip").is_file()
    except (FileNotFoundError, OSError):
        return False


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    block = _python_blocks()[index]
    if "load_omniglot" in block and not _omniglot_available():
        pytest.skip("the Omniglot archives are not here (set TINYMETA_DATA to their folder)")
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"README block {index} failed:\n{block}\n{result.stderr}"
