"""The README's Tour runs as written (a user copies it first)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _tour_block():
    text = README.read_text()
    section = text[text.index("## Tour"):text.index("## Layers")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Tour section should hold one python block"
    return blocks[0]


@pytest.mark.slow
def test_tour_runs_as_written(capsys):
    namespace = {"__name__": "readme_tour"}
    exec(compile(_tour_block(), "README.md#Tour", "exec"), namespace)
    result = namespace["result"]
    assert result.passed
    assert sorted(result.artifacts) == ["onnx", "saved_model"]
    assert namespace["report"].normalizations_after == 0
    printed = capsys.readouterr().out
    assert "Normalization diagnosis" in printed and "folded" in printed
