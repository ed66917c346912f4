"""examples/quickstart.ipynb: stored without outputs, and runs top to bottom (so it cannot rot)."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "quickstart.ipynb")


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_valid_and_stored_without_outputs():
    nb = _read()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], "clear the notebook's outputs before committing"
        assert cell.execution_count is None


def test_notebook_executes(tmp_path):
    nb = _read()
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    images = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data" and "image/png" in o.get("data", {})
    )
    assert "peft-loraone" in text
    assert "14 modules initialized" in text
    assert "init_lora_weights now: True" in text
    assert images == 2  # the alignment plot and the LoRA vs LoRA-One curves
    # the last cell's numbers: LoRA-One + preconditioning reaches < 1e-8 by step 25
    line = next(line for line in text.splitlines() if line.startswith("LoRA-One, preconditioned GD"))
    assert float(line.split("step 25:")[1].split()[0]) < 1e-8
