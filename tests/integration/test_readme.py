"""Every ```python block of README.md runs, in order, as written (in a temporary working directory)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as err:  # name the block, keep the traceback
            raise AssertionError(f"README python block {i + 1} failed:\n{block}") from err
    printed = capsys.readouterr().out
    assert "did you mean 'model.layers.12'?" in printed
    assert (tmp_path / "sentiment.safetensors").is_file()
