"""The README's generated blocks (cldf/evaluate/readme.py): parsing, splicing and the machine-free shape."""

from __future__ import annotations

import pytest

from cldf.errors import CldfError
from cldf.evaluate.readme import machine, read_block, shape, splice

from .workflow_utils import REPO

BLOCKS = {"demo": "results/synthetic", "brats18": "results/brats18_shared", "flare": "results/flare21_kidney_shared"}
TABLE = "Dataset `x`: 4 test cases.\n\n| method | Dice |\n|---|---|\n| CLDF | 0.764 (0.732–0.791) |"


def test_every_readme_block_names_its_results_and_machine() -> None:
    text = (REPO / "README.md").read_text()
    for tag, results in BLOCKS.items():
        block = read_block(text, tag)
        assert block.results == results, tag
        assert block.machine != "an unnamed machine" and "kernels, torch" in block.machine, tag
        assert block.body.startswith("Dataset `"), tag


def test_splice_replaces_one_block_and_names_the_machine() -> None:
    text = (REPO / "README.md").read_text()
    new = splice(text, "brats18", TABLE + "\n", "results/brats18_shared", "Some CPU, AVX2 kernels, torch 9")
    block = read_block(new, "brats18")
    assert (block.body, block.machine, block.results) == (TABLE, "Some CPU, AVX2 kernels, torch 9",
                                                          "results/brats18_shared")
    for tag in ("demo", "flare"):
        assert read_block(new, tag) == read_block(text, tag)
    before, after = text.split("<!-- brats18 tables")[0], text.split("<!-- end of brats18 tables -->")[1]
    assert new.startswith(before) and new.endswith(after)


def test_missing_block_is_a_clear_error() -> None:
    with pytest.raises(CldfError, match="no generated block 'demo'"):
        read_block("# a README without tables\n", "demo")


def test_shape_ignores_numbers_and_choices_only() -> None:
    other_numbers = TABLE.replace("0.764 (0.732–0.791)", "0.757 (−0.025–0.193)").replace("4 test", "5 test")
    assert shape(other_numbers) == shape(TABLE)
    choice = "| threshold:seam | `otsu` | 0.7 | 9 |"
    assert shape(TABLE + "\n" + choice) == shape(TABLE + "\n" + choice.replace("`otsu`", "`0.4`"))
    assert shape(TABLE + "\n| SEAM | 0.516 |") != shape(TABLE)
    assert shape(TABLE.replace("CLDF", "CLDF (AME-CAM)")) != shape(TABLE)


def test_machine_names_cpu_kernels_and_torch() -> None:
    import torch

    assert machine().endswith(f"{torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}")
