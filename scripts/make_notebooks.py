"""Write notebooks/*.ipynb from the cells below, without outputs (the notebooks are generated: edit this file, then
run `python scripts/make_notebooks.py`; `--check` exits 1 when a notebook differs from what it would write).

Each notebook runs top to bottom on Kaggle, Colab or a local Jupyter: the first cells install gemma_tune where it
is missing, choose the backend before Keras is imported, read credentials for real weights and print the
environment; `TINY` (GEMMA_TUNE_TINY, default 1) picks the tiny bundled configuration that runs on a CPU in CI
(tests/test_notebooks.py), else the matching real recipe.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def md(text: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(text).strip()


def code(text: str) -> tuple[str, str]:
    return "code", textwrap.dedent(text).strip()


def running(real: str) -> tuple[str, str]:
    """The markdown cell on where and how the notebook runs; `real`: what the real configuration trains."""
    return md(f"""
        **Running it.** On Kaggle or Colab, open the notebook and run all cells: the first installs gemma_tune
        when it is not importable (`GEMMA_TUNE_INSTALL`, default `gemma_tune`: any pip spec, e.g. a git URL
        `git+https://github.com/OWNER/REPO.git` or the path of a wheel). Locally: `pip install -e ".[jax]" jupyterlab`
        in a checkout, then `jupyter lab notebooks/`.

        Environment variables (or edit the settings cell):
        - `KERAS_BACKEND`: `jax` (default), `tensorflow` or `torch`, chosen before Keras is imported;
        - `GEMMA_TUNE_TINY`: `1` (default) trains the tiny bundled model on a CPU in well under a minute (what CI
          runs); `0` runs the real configuration, {real}, on an accelerator, with credentials;
        - `GEMMA_TUNE_NOTEBOOK_OUT`: where the runs go (default: a new temporary directory; on Kaggle,
          `/kaggle/working` keeps them as the notebook's output).
        """)


INSTALL = code("""
    # Install gemma_tune unless it is importable (Kaggle, Colab). GEMMA_TUNE_INSTALL: anything pip installs, such
    # as the package name, "git+https://github.com/OWNER/REPO.git" or "/kaggle/input/…/gemma_tune-….whl".
    import importlib
    import importlib.util
    import os
    import subprocess
    import sys

    GEMMA_TUNE_INSTALL = os.environ.get("GEMMA_TUNE_INSTALL", "gemma_tune")
    if importlib.util.find_spec("gemma_tune") is None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", GEMMA_TUNE_INSTALL])
        importlib.invalidate_caches()
    """)

SETTINGS = code("""
    # Settings. The backend must be chosen before Keras is imported: if Keras already is, with another backend,
    # this cell says so and how to restart.
    import os
    import tempfile
    from pathlib import Path

    from gemma_tune.notebook import use_backend

    BACKEND = os.environ.get("KERAS_BACKEND", "jax")  # "jax", "tensorflow" or "torch"
    use_backend(BACKEND)
    TINY = os.environ.get("GEMMA_TUNE_TINY", "1") == "1"  # True: tiny bundled model on a CPU; False: real weights
    OUT = Path(os.environ.get("GEMMA_TUNE_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="gemma_tune-"))
    print(f"backend {BACKEND}, {'tiny' if TINY else 'real'} configuration, runs under {OUT}")
    """)

CREDENTIALS = code("""
    # Real weights download from the Hugging Face hub (HF_TOKEN, from an account that accepted the model's
    # licence) or Kaggle (KAGGLE_USERNAME, KAGGLE_KEY): read from the environment, Kaggle's secrets (Add-ons >
    # Secrets) or Colab's (the key icon) into the environment. Only whether each is found is printed.
    from gemma_tune.notebook import credentials

    if not TINY:
        for name, where in credentials().items():
            print(f"{name:16} {'found in ' + where if where else 'not found'}")
    """)

ENVIRONMENT = code("""
    from gemma_tune.environment import report

    print("\\n".join(report(BACKEND)))
    """)

SET_UP = [INSTALL, SETTINGS, CREDENTIALS, ENVIRONMENT]


QUICKSTART = [
    md("""
        # gemma_tune quickstart: LoRA fine-tuning, export, generation

        Supervised fine-tuning with LoRA from the bundled `quickstart` recipe, the export of the tuned model as a
        Keras archive and a Hugging Face checkpoint, and generation from the run: the Python API does what the
        `gemma-tune` commands do (`gemma-tune run`, `export`, `generate`).
        """),
    running("`gemma3_1b_lora_chat` (Gemma 3 1B instruction-tuned, `hf://google/gemma-3-1b-it`, LoRA on UltraChat)"),
    *SET_UP,
    md("""
        ## The recipe
        `quickstart` is a bundled recipe (`recipes/quickstart.yaml`; a name or a YAML path both work): LoRA rank 16
        on every projection of a tiny Gemma 3-architecture model, randomly initialised, learning the bundled chat
        data. Overrides are the `key=value` strings of the command line (`gemma-tune keys train` lists the keys).
        The tiny configuration trains 30 of its 120 steps; the recipe's own exports are turned off, to show the
        export step on its own below.
        """),
    code("""
        import gemma_tune

        RECIPE = "quickstart" if TINY else "gemma3_1b_lora_chat"
        OVERRIDES = [f"output_dir={OUT / RECIPE}", "export.formats=[]"]
        if TINY:  # seconds of training on a 2-core CPU; no mid-run checkpoints, evaluations or samples
            OVERRIDES += ["train.max_steps=30", "train.log_every=5", "train.save_every=null", "train.eval_every=null",
                          "train.sample_prompts=[]"]
        recipe = gemma_tune.load_recipe(RECIPE, OVERRIDES)
        print(f"{recipe.name}: {recipe.method}, LoRA rank {recipe.lora.rank}, {recipe.train.max_steps} steps of "
              f"batch {recipe.train.batch_size} -> {recipe.output_dir}")
        """),
    md("""
        ## Training
        `gemma_tune.run` is `gemma-tune run`; running it again continues the run (or finds it complete). The bar
        counts the batches; the summary follows when the run ends.
        """),
    code("""
        from gemma_tune.notebook import progress_bar

        result = gemma_tune.run(recipe, callbacks=[progress_bar()])
        """),
    md("""
        ## The loss curve
        From the run directory's metrics.jsonl (train rows every `train.log_every` steps, eval at the end); the run
        directory also holds loss_curve.png, metrics.csv and TensorBoard logs.
        """),
    code("""
        from gemma_tune.notebook import show_metrics

        show_metrics(result, ["loss", "accuracy"])
        print(f"loss {result.history['loss'][0]:.3f} -> {result.history['loss'][-1]:.3f}")
        print("run directory:", ", ".join(sorted(p.name for p in result.run_dir.iterdir())))
        """),
    md("""
        ## Export
        The run's last checkpoint, loaded as `gemma-tune export RUN …` loads it, then written as a `.keras` archive
        with a keras-hub preset and as a Hugging Face safetensors checkpoint (LoRA merged) that transformers loads.
        With `export.formats` in the recipe the run writes them itself, into its `exports/`.
        """),
    code("""
        from gemma_tune.export import export_model

        model, tokenizer = gemma_tune.load_model_and_tokenizer(result.run_dir)
        exports = {fmt: export_model(model, tokenizer, OUT / "exports" / f"{RECIPE}-{fmt}", fmt, force=True)
                   for fmt in ("keras", "safetensors")}
        for fmt, path in exports.items():
            print(f"{fmt:12} {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")
        """),
    md("""
        ## Generation
        Greedy decoding with the KV cache, as `gemma-tune generate RUN --prompt …` does (`temperature`, `top_k`,
        `top_p` sample). The prompt is wrapped in Gemma's chat template. The exports load the same way:
        `gemma_tune.load_model_and_tokenizer(exports["safetensors"])`.
        """),
    code("""
        from gemma_tune.generate import generate

        PROMPTS = ["What is 2 plus 3?"] if TINY else ["What is LoRA fine-tuning? Answer in two sentences."]
        completions = generate(model, tokenizer, PROMPTS, max_new_tokens=32)
        for prompt, completion in zip(PROMPTS, completions):
            print(f"### {prompt}\\n{completion}\\n")
        """),
]


PREFERENCE = [
    md("""
        # gemma_tune preference tuning: DPO and SimPO

        Two ways to learn from prompt / chosen / rejected pairs, on the same pairs and model: DPO (the bundled
        `quickstart_dpo` recipe) and SimPO (`quickstart_simpo`), their metrics under TRL's names, and the two
        compared.
        """),
    running("`gemma3_1b_dpo_lora` (DPO with LoRA on Gemma 3 1B, UltraFeedback) and `gemma2_9b_simpo` (the SimPO "
            "authors' settings: full fine-tuning of Gemma 2 9B, which needs a large accelerator)"),
    *SET_UP,
    md("""
        ## The recipes
        The two quickstarts fully fine-tune the tiny Gemma 3-architecture model on the bundled pairs
        (`data/tiny/preference.jsonl`, also their eval split: how well the training pairs are ranked); the tiny
        configuration trains 40 of their 100 steps. (The real recipes differ in model and data too.)

        - **DPO** (β 0.1) compares the model with a reference, the starting model. Loss −log σ(β·Δ), Δ the chosen
          minus the rejected log-ratio to the reference; the rewards are β·(log π − log π_ref). With full
          fine-tuning the reference's log-probabilities are computed once, before training; with LoRA
          (`gemma3_1b_dpo_lora`) the reference is the same model with its adapters off.
        - **SimPO** (here β 2, γ 1) needs no reference: loss −log σ(β·(ā_chosen − ā_rejected) − γ), ā the
          per-token mean log-probability; the rewards are β·ā.
        """),
    code("""
        import gemma_tune
        from gemma_tune.notebook import progress_bar

        RECIPES = ({"DPO": "quickstart_dpo", "SimPO": "quickstart_simpo"} if TINY else
                   {"DPO": "gemma3_1b_dpo_lora", "SimPO": "gemma2_9b_simpo"})
        TINY_OVERRIDES = ["train.max_steps=40", "train.log_every=10", "train.save_every=null",
                          "train.eval_every=null", "export.formats=[]"]


        def train(method: str) -> gemma_tune.RunResult:
            recipe = RECIPES[method]
            overrides = [f"output_dir={OUT / recipe}"] + (TINY_OVERRIDES if TINY else [])
            return gemma_tune.run(recipe, overrides, callbacks=[progress_bar(method)])


        results = {}
        """),
    md("## DPO"),
    code("""results["DPO"] = train("DPO")"""),
    md("## SimPO"),
    code("""results["SimPO"] = train("SimPO")"""),
    md("""
        ## The metrics, under TRL's names
        Means over pairs: `rewards/chosen` and `rewards/rejected` (the methods' implicit rewards), `rewards/margins`
        (chosen − rejected), `rewards/accuracies` (the share of pairs whose chosen reward is the larger),
        `logps/chosen` and `logps/rejected` (summed log-probabilities). The train columns are the last logged
        window (`train.log_every` steps), the eval columns all the eval pairs at the end.
        """),
    code("""
        import pandas as pd

        METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                   "logps/chosen", "logps/rejected"]
        table = {}
        for method, result in results.items():
            table[f"{method} train"] = {name: result.history[name][-1] for name in METRICS}
            table[f"{method} eval"] = {name: result.history[f"eval_{name}"][-1] for name in METRICS}
        pd.DataFrame(table).round(4)
        """),
    md("""
        ## DPO and SimPO compared
        The losses and rewards are on different scales (DPO's rewards are log-ratios to the reference times β,
        SimPO's per-token mean log-probabilities times β); what compares directly is `rewards/accuracies`, how
        often the chosen answer wins, and the log-probabilities themselves. SimPO also needs no reference pass.
        """),
    code("""
        from gemma_tune.notebook import show_metrics

        show_metrics(results, ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen"])
        for method, result in results.items():
            print(f"{method:6} eval: chosen preferred in {result.history['eval_rewards/accuracies'][-1]:.0%} of pairs, "
                  f"margin {result.history['eval_rewards/margins'][-1]:+.3f}; loss "
                  f"{result.history['loss'][0]:.3f} -> {result.history['loss'][-1]:.3f}")
        """),
]


VISION = [
    md("""
        # gemma_tune vision: PaliGemma captions

        LoRA on a PaliGemma-architecture model (SigLIP image encoder + Gemma decoder) with the bundled
        `paligemma_quickstart` recipe on the bundled shapes-and-captions images (`data/tiny_vision/`), then a
        caption for one of its held-out images.
        """),
    running("`paligemma2_3b_224_caption` (PaliGemma 2 3B at 224 px, `hf://google/paligemma2-3b-pt-224`, on "
            "Flickr8k captions)"),
    *SET_UP,
    md("""
        ## The recipe
        The SigLIP encoder stays frozen; the decoder gets LoRA adapters and the projection of image features into it
        trains (`model.train_vision: projector`). Rows are `image` / `prefix` / `suffix`: the prefix ("caption en")
        and the image are the prompt, the suffix is learnt. The tiny configuration trains 30 of the recipe's 300
        steps and exports the safetensors checkpoint (with the processor files) alone.
        """),
    code("""
        import gemma_tune

        RECIPE = "paligemma_quickstart" if TINY else "paligemma2_3b_224_caption"
        OVERRIDES = [f"output_dir={OUT / RECIPE}"]
        if TINY:  # seconds of training on a 2-core CPU; no mid-run checkpoints, evaluations or samples
            OVERRIDES += ["train.max_steps=30", "train.warmup_steps=3", "train.log_every=5", "train.save_every=null",
                          "train.eval_every=null", "train.sample_prompts=[]", "export.formats=[safetensors]"]
        """),
    code("""
        from gemma_tune.notebook import progress_bar, show_metrics

        result = gemma_tune.run(RECIPE, OVERRIDES, callbacks=[progress_bar()])
        show_metrics(result, ["loss", "accuracy"])
        """),
    md("""
        ## A caption
        A held-out image of the bundled set (from the eval split, `data/tiny_vision/captions_eval.jsonl`), shown
        enlarged, and the tuned model's greedy caption, as `gemma-tune generate RUN --image IMAGE --prompt
        "caption en"` gives it. After 30 steps on a CPU expect noise; the full recipe learns captions such as
        "a blue circle on the left".
        """),
    code("""
        import json

        from PIL import Image

        from gemma_tune.config.paths import BUNDLED

        IMAGE = BUNDLED / "data" / "tiny_vision" / "images" / "150.png"
        rows = [json.loads(line) for line in (IMAGE.parent.parent / "captions_eval.jsonl").read_text().splitlines()]
        print("its caption in the data:", next(row["suffix"] for row in rows if row["image"] == "images/150.png"))
        Image.open(IMAGE).resize((168, 168), Image.NEAREST)
        """),
    code("""
        from gemma_tune.generate import generate

        model, tokenizer = gemma_tune.load_model_and_tokenizer(result.run_dir)
        captions = generate(model, tokenizer, ["caption en"], images=[[IMAGE]], max_new_tokens=16)
        print("caption:", captions[0])
        print("export:", ", ".join(f"{fmt} {path}" for fmt, path in result.exports.items()))
        """),
]


NOTEBOOKS = {"quickstart": QUICKSTART, "preference": PREFERENCE, "vision": VISION}
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}


def notebook(name: str) -> nbformat.NotebookNode:
    """Notebook `name` of NOTEBOOKS, without outputs; cell ids `<name>-<index>`, so that it is the same every time."""
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.id = f"{name}-{i:02d}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells, metadata=METADATA)
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = NOTEBOOKS_DIR / f"{name}.ipynb"
        text = nbformat.writes(notebook(name)) + "\n"
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
