"""The README's Python snippet runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_snippet_runs():
    text = README.read_text()
    section = text[text.index("## PyTorch") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    compiled = namespace["compiled"]
    a, b = namespace["a"], namespace["b"]
    import torch

    assert torch.equal(compiled(a, b), namespace["c"].relu())
