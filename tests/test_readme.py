"""What the README shows must run as written: its ```python blocks are executed (tiny models, a temporary working
directory), and its zero-shot template count is the one the code uses."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the README's fenced ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Run in an empty working directory, with tempfile's folders inside it and one torch thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks and any("florence.create_model" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text(encoding="utf-8")))))
def test_readme_python_block_runs(index, sandbox):
    block = python_blocks(README.read_text(encoding="utf-8"))[index]
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)  # noqa: S102 - our own README
    written = sum(f.stat().st_size for f in sandbox.rglob("*") if f.is_file())
    assert written < 50 << 20  # tiny models only: nothing near a real-size bundle
    if "model" in namespace and hasattr(namespace["model"], "encode_text"):  # the dual encoder came back from disk
        assert namespace["model"].tokenize(["a photo of a cat"])["input_ids"].shape[0] == 1


def test_readme_zero_shot_template_count_is_the_codes():
    """The demo's zero-shot figures come from `florence eval zeroshot` on Fashion-MNIST: the README's template count
    must be the size of the set that command uses (the dataset spec's set, evaluate_zeroshot's default)."""
    from florence.adapters.prompt_templates import get_template_set
    from florence.adapters.zeroshot import DEFAULT_TEMPLATES
    from florence.benchmarks.datasets import get_spec

    row = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| zero-shot"))
    stated = int(re.search(r"(\d+) (?:CLIP ImageNet )?templates", row).group(1))
    used = get_template_set(get_spec("fashion_mnist").template_set)
    assert stated == len(used) == len(DEFAULT_TEMPLATES) == 80 and tuple(used) == DEFAULT_TEMPLATES
