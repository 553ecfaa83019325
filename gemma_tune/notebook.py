"""What the notebooks (notebooks/*.ipynb) need besides the Python API, for any notebook that runs gemma_tune:
the backend check, credentials without printing them, a progress bar for `gemma_tune.run` and metric curves
shown inline.

Importing this module imports neither Keras nor a backend, so `use_backend` can come first; `progress_bar`
imports Keras, and so comes after it.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from gemma_tune.backend import BACKENDS, select_backend
from gemma_tune.errors import UserError

CREDENTIALS = ("HF_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY")  # what huggingface_hub and kagglehub read
RESTART = ("in a notebook, restart the kernel (Jupyter and Kaggle: Kernel > Restart; Colab: Runtime > Restart "
           "session) and run it from the top, or use BACKEND = {active!r}")


class RestartKernel(UserError):
    """Keras is already imported with another backend. IPython shows the message alone, without a traceback
    (`_render_traceback_`), and stops there when the notebook is run top to bottom."""

    def _render_traceback_(self) -> list[str]:
        return [str(self)]


def use_backend(backend: str) -> str:
    """Choose `backend` for Keras (`gemma_tune.backend.select_backend`) and return it; call it before Keras is
    imported. When Keras is already imported with another backend: `RestartKernel`, select_backend's message
    followed by how to restart. An unknown backend name is select_backend's UserError."""
    try:
        return select_backend(backend)
    except UserError as e:
        if backend not in BACKENDS:
            raise
        import keras  # imported already: that is why select_backend refused

        raise RestartKernel(f"{e.message}; {RESTART.format(active=keras.backend.backend())}", where=e.where) from None


def _kaggle_secret(name: str) -> str | None:
    try:
        from kaggle_secrets import UserSecretsClient
    except ImportError:
        return None
    try:
        return UserSecretsClient().get_secret(name)
    except Exception:  # noqa: BLE001 - a secret that is not there, or not attached to this notebook
        return None


def _colab_secret(name: str) -> str | None:
    try:
        from google.colab import userdata
    except ImportError:
        return None
    try:
        return userdata.get(name)
    except Exception:  # noqa: BLE001 - SecretNotFoundError, or the notebook not given access to it
        return None


SECRET_STORES = (("Kaggle secrets", _kaggle_secret), ("Colab secrets", _colab_secret))


def _from_secret_stores(name: str) -> str | None:
    """The first secret store (`SECRET_STORES`) that has `name`, its value put into os.environ; None if none has."""
    for store, read in SECRET_STORES:
        value = read(name)
        if value:
            os.environ[name] = value
            return store
    return None


def credentials(names: Iterable[str] = CREDENTIALS) -> dict[str, str | None]:
    """Make each credential in `names` an environment variable, where huggingface_hub (HF_TOKEN) and kagglehub
    (KAGGLE_USERNAME, KAGGLE_KEY) read it, from the first place that has it: the environment, then Kaggle's
    secrets (`kaggle_secrets.UserSecretsClient`), then Colab's (`google.colab.userdata`). Returns name -> where
    it was found ("environment", "Kaggle secrets", "Colab secrets"; None: nowhere). The values are neither
    returned nor printed."""
    return {name: "environment" if os.environ.get(name) else _from_secret_stores(name) for name in names}


@functools.cache
def _progress_bar_class():
    import keras
    from tqdm.auto import tqdm

    class ProgressBar(keras.callbacks.Callback):
        """A tqdm bar over the micro-batches of `fit`, opened when training begins, closed when it ends."""

        def __init__(self, description: str):
            super().__init__()
            self.description = description
            self.bar = None

        def on_train_begin(self, logs=None):
            self.bar = tqdm(total=self.params["steps"], desc=self.description, unit="batch")

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)

        def on_train_end(self, logs=None):
            self.bar.close()

    return ProgressBar


def progress_bar(description: str = "training"):
    """A Keras callback for `gemma_tune.run(..., callbacks=[progress_bar()])`: a `tqdm.auto` bar (a widget
    where ipywidgets is installed, as on Kaggle and Colab; text otherwise) counting the micro-batches to go
    (the steps left × train.grad_accum). The run's own bar is drawn on terminals only. Imports Keras."""
    return _progress_bar_class()(description)


def metric_rows(run) -> list[dict]:
    """The rows of a run's metrics.jsonl (`{"step", "split", <metric>: value}`); `run`: a `RunResult` or a
    run directory."""
    path = Path(getattr(run, "run_dir", run)) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def show_metrics(runs, keys: Iterable[str] = ("loss",)) -> None:
    """Show one panel per metric in `keys` against step, inline (an IPython PNG): each run's train rows as a
    line, its eval rows as points. `runs`: a `RunResult` or run directory, or a mapping label -> either. A key
    that no run logged is a UserError naming those they did."""
    from IPython.display import Image, display
    from matplotlib.figure import Figure  # not pyplot: the same whatever backend is active (a run sets Agg)

    runs = {label: metric_rows(run) for label, run in (runs if isinstance(runs, Mapping) else {"": runs}).items()}
    keys = list(keys)
    logged = {key for rows in runs.values() for row in rows for key, value in row.items() if value is not None}
    if missing := [key for key in keys if key not in logged]:
        raise UserError(f"not logged by these runs: {', '.join(missing)}; they logged "
                        f"{', '.join(sorted(logged - {'step', 'split'}))}", where="show_metrics")
    fig = Figure(figsize=(5 * len(keys), 3.5), dpi=100)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for i, (label, rows) in enumerate(runs.items()):
        for ax, key in zip(axes, keys):
            for split, style in (("train", "-"), ("eval", "o")):
                points = [(r["step"], r[key]) for r in rows if r["split"] == split and r.get(key) is not None]
                if points:  # each run in its colour of matplotlib's cycle
                    ax.plot(*zip(*points), style, color=f"C{i}", label=f"{label} {split}".strip())
    for ax, key in zip(axes, keys):
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    display(Image(data=png.getvalue()))
