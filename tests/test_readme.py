"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- example -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its <!-- example --> python block"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README example", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all("top proponent S" in line for line in out)
