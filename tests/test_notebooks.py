"""The notebooks (notebooks/*.ipynb, written by scripts/make_notebooks.py) run top to bottom, in their tiny
configuration, in a Jupyter kernel of this interpreter with the environment's KERAS_BACKEND; the helpers they use
(gemma_tune.notebook) do what they say.

Each notebook runs as it is, with a last cell added that prints what the test checks (PROBE and a JSON object of
the kernel's variables); its runs go to a temporary directory (GEMMA_TUNE_NOTEBOOK_OUT), its working directory
is another.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from gemma_tune.errors import UserError
from gemma_tune.notebook import CREDENTIALS, RestartKernel, credentials, show_metrics, use_backend

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "gemma_tune_test"
PROBE = "PROBE "
BACKEND = os.environ["KERAS_BACKEND"]  # set by conftest.py when CI does not


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """The name of a kernel spec that starts ipykernel with this interpreter (installed into a temporary prefix,
    found through JUPYTER_PATH), so no other python3 kernel on the machine is picked. The kernels inherit
    conftest.py's OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads (torch's) made the torch notebooks 10 to 50
    times slower on a machine whose cores are busy with other work."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL, prefix=str(prefix))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield KERNEL


def execute(nb: nbformat.NotebookNode, kernel: str, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell of `nb` in a new `kernel` started in `cwd` (raises CellExecutionError at a cell that
    fails); returns `nb` with its outputs."""
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def run_notebook(name: str, probe: str, kernel: str, tmp_path: Path,
                 monkeypatch) -> tuple[nbformat.NotebookNode, dict, Path]:
    """Notebook `name` run with a last cell printing PROBE + json.dumps(`probe`): (the notebook with its outputs,
    the probed values, the directory its runs went to)."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("GEMMA_TUNE_NOTEBOOK_OUT", str(out))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json\nprint({PROBE!r} + json.dumps({probe}))"))
    execute(nb, kernel, cwd)
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert list(cwd.iterdir()) == [], "the notebook wrote into its working directory"
    return nb, json.loads(printed.split(PROBE, 1)[1]), out


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def assert_ran_cleanly(nb: nbformat.NotebookNode) -> None:
    """Every code cell ran, none errored, no traceback was printed."""
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    streams = "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")
    assert "Traceback" not in streams


def images_shown(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


def progress_drawn(nb: nbformat.NotebookNode, description: str, total: int) -> bool:
    """Whether the progress bar `description` reached `total` batches: tqdm's text bar, or its widget where
    ipywidgets is installed (a display of the bar's box, whose last state nbclient keeps in the metadata)."""
    text = "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")
    if re.search(rf"{description}: 100%\|\S*\| {total}/{total} \[", text):
        return True
    states = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for o in outputs(nb):
        view = o.get("data", {}).get("application/vnd.jupyter.widget-view+json")
        if view and o["data"].get("text/plain", "").startswith(f"{description}:"):
            box = states[view["model_id"]]["state"]
            parts = [states[child.removeprefix("IPY_MODEL_")]["state"] for child in box["children"]]
            if any(part["_model_name"] == "FloatProgressModel" and part["value"] == part["max"] == total
                   for part in parts):
                return True
    return False


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert (run_dir / "metrics.csv").exists() and (run_dir / "loss_curve.png").exists()
    return [r["loss"] for r in rows if r["split"] == "train"]


def assert_loss_fell(run_dir: Path, out: Path) -> None:
    assert run_dir.is_relative_to(out), "runs go to GEMMA_TUNE_NOTEBOOK_OUT"
    losses = train_losses(run_dir)
    assert len(losses) >= 3 and losses[-1] < losses[0], losses


def test_notebooks_are_generated_and_have_no_outputs():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    make_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebooks)
    assert make_notebooks.main(["--check"]) == 0, "run python scripts/make_notebooks.py"
    for name in make_notebooks.NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
        assert "find_spec(\"gemma_tune\")" in code[0].source and "use_backend(BACKEND)" in code[1].source


def test_quickstart(kernel, tmp_path, monkeypatch):
    nb, probed, out = run_notebook(
        "quickstart", '{"run_dir": str(result.run_dir), "exports": {k: str(v) for k, v in exports.items()}, '
                      '"completions": completions, "backend": BACKEND, "tiny": TINY}', kernel, tmp_path, monkeypatch)
    assert_ran_cleanly(nb)
    assert probed["backend"] == BACKEND and probed["tiny"] is True
    assert_loss_fell(Path(probed["run_dir"]), out)
    assert progress_drawn(nb, "training", 30) and images_shown(nb) == 1
    keras_export, hf_export = Path(probed["exports"]["keras"]), Path(probed["exports"]["safetensors"])
    assert keras_export.is_relative_to(out) and list(keras_export.glob("*.keras"))
    assert (hf_export / "config.json").exists() and list(hf_export.glob("*.safetensors"))
    [completion] = probed["completions"]
    assert isinstance(completion, str) and completion.strip()


def test_preference(kernel, tmp_path, monkeypatch):
    nb, probed, out = run_notebook(
        "preference", '{name: {"run_dir": str(r.run_dir), "history": sorted(r.history)} '
                      'for name, r in results.items()}',
        kernel, tmp_path, monkeypatch)
    assert_ran_cleanly(nb)
    assert set(probed) == {"DPO", "SimPO"}
    trl = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected"}
    for run in probed.values():
        assert_loss_fell(Path(run["run_dir"]), out)
        assert trl <= set(run["history"]) and {f"eval_{name}" for name in trl} <= set(run["history"])
    table = [o for o in outputs(nb) if "text/html" in o.get("data", {})]
    assert len(table) == 1 and all(name in table[0]["data"]["text/html"] for name in trl)
    assert "DPO eval" in table[0]["data"]["text/html"] and "SimPO eval" in table[0]["data"]["text/html"]
    assert progress_drawn(nb, "DPO", 40) and progress_drawn(nb, "SimPO", 40) and images_shown(nb) == 1


def test_vision(kernel, tmp_path, monkeypatch):
    nb, probed, out = run_notebook(
        "vision", '{"run_dir": str(result.run_dir), "exports": {k: str(v) for k, v in result.exports.items()}, '
                  '"captions": captions, "image": str(IMAGE)}', kernel, tmp_path, monkeypatch)
    assert_ran_cleanly(nb)
    assert_loss_fell(Path(probed["run_dir"]), out)
    assert progress_drawn(nb, "training", 30) and images_shown(nb) == 2  # the metrics and the image
    assert Path(probed["image"]).exists()
    assert (Path(probed["exports"]["safetensors"]) / "preprocessor_config.json").exists()
    [caption] = probed["captions"]
    assert isinstance(caption, str) and caption.strip()


def test_keras_imported_with_another_backend_stops_at_the_settings_cell(kernel, tmp_path):
    """Keras imported first with another backend: the settings cell shows select_backend's message and how to
    restart, without a traceback, and running the notebook top to bottom stops there."""
    other = "torch" if BACKEND == "jax" else "jax"
    settings = next(cell for cell in nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4).cells
                    if "use_backend(BACKEND)" in cell.source)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import os\nos.environ['KERAS_BACKEND'] = {other!r}\nimport keras\n"
                                  f"os.environ['KERAS_BACKEND'] = {BACKEND!r}"),
        settings,
        nbformat.v4.new_code_cell("print('not reached')"),
    ])
    with pytest.raises(CellExecutionError):
        execute(nb, kernel, tmp_path)
    [error] = nb.cells[1].outputs
    assert error.output_type == "error" and error.ename == "RestartKernel"
    [message] = error.traceback
    assert f"Keras is already imported with the {other} backend" in message
    assert "restart the kernel" in message and f"BACKEND = {other!r}" in message
    assert nb.cells[2].outputs == []


def test_use_backend_passes_other_errors_on():
    with pytest.raises(UserError) as raised:
        use_backend("numpy")
    assert not isinstance(raised.value, RestartKernel)


def test_credentials_from_environment_and_secret_stores_never_printed(monkeypatch, capsys):
    class Secrets:
        def get_secret(self, name):
            if name != "HF_TOKEN":
                raise ValueError(f"no secret {name}")
            return "hf-secret-from-kaggle"

    kaggle = types.ModuleType("kaggle_secrets")
    kaggle.UserSecretsClient = Secrets
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=lambda name: {"KAGGLE_USERNAME": "user-from-colab"}[name])
    monkeypatch.setitem(sys.modules, "kaggle_secrets", kaggle)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)

    found = credentials()
    assert found == {"HF_TOKEN": "Kaggle secrets", "KAGGLE_USERNAME": "Colab secrets", "KAGGLE_KEY": None}
    assert os.environ["HF_TOKEN"] == "hf-secret-from-kaggle" and os.environ["KAGGLE_USERNAME"] == "user-from-colab"
    assert "KAGGLE_KEY" not in os.environ

    monkeypatch.setenv("HF_TOKEN", "hf-secret-from-env")
    assert credentials(["HF_TOKEN"]) == {"HF_TOKEN": "environment"}
    assert os.environ["HF_TOKEN"] == "hf-secret-from-env"
    assert capsys.readouterr() == ("", "")


def test_credentials_without_secret_stores(monkeypatch):
    monkeypatch.setitem(sys.modules, "kaggle_secrets", None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, "google.colab", None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert credentials(["HF_TOKEN"]) == {"HF_TOKEN": None}


def test_show_metrics_draws_each_run_and_names_unlogged_keys(tmp_path, monkeypatch):
    import IPython.display

    runs = {}
    for name, offset in (("a", 0.0), ("b", 1.0)):
        rows = [{"step": s, "split": "train", "loss": 3.0 - s / 10 + offset, "rewards/margins": None} for s in (5, 10)]
        rows.append({"step": 10, "split": "eval", "loss": 2.5 + offset})
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = tmp_path / name
    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    show_metrics(runs, ["loss"])
    show_metrics(runs["a"])
    assert [type(s) for s in shown] == [IPython.display.Image] * 2
    assert all(s.data.startswith(b"\x89PNG") for s in shown)
    with pytest.raises(UserError, match="not logged by these runs: rewards/margins; they logged loss"):
        show_metrics(runs, ["loss", "rewards/margins"])
