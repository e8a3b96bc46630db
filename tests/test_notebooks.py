"""Every notebook in notebooks/ runs top to bottom on tiny settings and draws its figures; the committed
notebooks carry no outputs.

Each notebook runs with nbclient in a fresh temporary working directory, with `HIER_LM_NOTEBOOK_SMOKE=1`
(its first code cell then picks tiny settings) and `HIER_LM_DATA` inside that directory. The kernel is the
`python3` kernel spec written by ipykernel for this very interpreter, so it sees the same environment."""

import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
# figures each notebook must draw (any other notebook: at least one)
MIN_FIGURES = {"quickstart": 1, "attention_patterns": 4}  # losses; level maps, A_h vs A_full, TV rows, FLASH
CELL_TIMEOUT_S = 300  # a hung cell fails instead of stalling the suite (smoke runs take seconds)


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A Jupyter data folder whose `python3` kernel runs `sys.executable` (it comes first on JUPYTER_PATH,
    ahead of any other `python3` spec of the machine or the user)."""
    root = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(root / "kernels" / "python3")
    return root


def execute(nb, workdir: Path, kernel_path: Path, monkeypatch) -> None:
    """Run every cell of `nb` in place (outputs filled in); raises on the first cell error."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("HIER_LM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("HIER_LM_DATA", str(workdir / "data"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend, which emits image/png outputs
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()


def outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def test_notebooks_exist():
    names = {path.name for path in NOTEBOOKS}
    assert {"quickstart.ipynb", "attention_patterns.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "the kernel spec must be python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count: clear outputs"
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert "HIER_LM_NOTEBOOK_SMOKE" in first.source, (
        f"{path.name}: its first code cell must read HIER_LM_NOTEBOOK_SMOKE and pick tiny settings when it is 1")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path, kernel_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    execute(nb, tmp_path, kernel_path, monkeypatch)  # nbclient raises CellExecutionError on any cell error
    figures = [o for o in outputs(nb) if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    expected = MIN_FIGURES.get(path.stem, 1)
    assert len(figures) >= expected, f"{path.name} drew {len(figures)} figures (image/png outputs), expected {expected}"
    assert all(len(o.data["image/png"]) > 1000 for o in figures)  # base64 PNGs, not empty canvases


@pytest.mark.slow
def test_kernel_is_this_interpreter(tmp_path, kernel_path, monkeypatch):
    """The kernel the notebooks run in is the test's own Python (the project's virtual environment)."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())"))
    execute(nb, tmp_path, kernel_path, monkeypatch)
    printed = "".join(o.get("text", "") for o in outputs(nb)).split()
    assert Path(printed[0]).resolve() == Path(sys.executable).resolve()
    assert Path(printed[1]).resolve() == tmp_path.resolve()
