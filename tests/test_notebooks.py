"""The notebooks: executed top to bottom on the embedded default (slow), and their stored outputs kept clean."""

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MACHINE_PATH = re.compile(r"/(root|tmp|work)/|/home/\w|/Users/\w|[A-Z]:\\\\")


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["evaluation.ipynb", "quickstart.ipynb", "should_i_rerank.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_complete_and_leak_no_machine_paths(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs for cell in code), "every code cell has stored output (run `make notebooks`)"
    for cell in code:
        for output in cell.outputs:
            assert output.output_type != "error"
            text = str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
            assert not MACHINE_PATH.search(text), f"machine path in output: {text[:200]}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert all(cell.outputs for cell in notebook.cells if cell.cell_type == "code")
