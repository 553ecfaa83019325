"""`repro(run_dir)`: re-run a stored run's resolved recipe in a fresh directory and compare its metric history,
step by step, with the recorded one.

A stored run is a run directory's recipe.yaml, manifest.json and metrics.jsonl (nothing else is read, and
the stored directory is never written to). In order:

1. Relocation: a recorded absolute path (`gemma_tune.config.compose.PATH_KEYS`) that does not exist here is looked up by successively
   shorter trailing parts of it under the current directory, the run directory's parents and the bundled
   files (`gemma_tune.config.paths.BUNDLED`): `/elsewhere/gemma_tune/bundled/data/tiny/chat.jsonl` is found as
   `BUNDLED/data/tiny/chat.jsonl`. Found nowhere: a UserError naming the key and the path.
2. Environment, before any compute: the manifest against `gemma_tune.environment.environment(backend)` —
   every package version, the CPU model, the devices (kind and name), the backend, the seed, and the
   fingerprints (SHA-256, files, bytes) of the data and tokenizer files the re-run reads. Each difference is a
   warning; with `strict` an error, and nothing is re-run (`ReproResult.rerun` False, not passed).
3. The re-run: the recorded recipe with `output_dir` replaced (`out`, else a temporary directory removed
   afterwards) and `export.formats=[]` (exports do not change training), trained from scratch for the first
   `steps` optimisation steps (default: the last recorded step). The schedule is the recipe's own
   (`train.max_steps` is not changed: a cosine schedule depends on it); training stops after step `steps`.
4. Comparison: every numeric metric of every recorded row up to step `steps` (train rows by name, eval rows as
   `eval_<name>`, as `RunResult.history` names them), learning rate and token counts included, timing and
   hardware figures (`EXCLUDED_METRICS`) not. A pair passes when

       relative difference = |now − recorded| / max(|recorded|, 1e-12) ≤ rtol

   (with rtol 0: exactly equal). A recorded row or metric the re-run lacks fails.

Tolerance (`rtol`, unless given): 0 — bit-identical — when the backend, the CPU model, the devices and every
package version are those recorded and the devices are CPUs (the same backend on the same CPU computes the
same bits here: data order from NumPy seeded by [seed, epoch], initial weights and LoRA A drawn on the host
with NumPy, dropout from the backend's seeded RNG). Otherwise (another backend, version or CPU, or an
accelerator, whose kernels may reorder sums) `DEFAULT_RTOL` = 1e-3; `ReproResult.why_rtol` says which applied
and why.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemma_tune.config.compose import PATH_KEYS, get_key, set_key
from gemma_tune.config.paths import BUNDLED, is_remote
from gemma_tune.config.schema import Recipe
from gemma_tune.console import use_console
from gemma_tune.errors import UserError
from gemma_tune.rundir import fingerprint, is_run_dir

log = logging.getLogger("gemma_tune")

EXCLUDED_METRICS = ("tokens_per_s", "mfu", "peak_memory_gib", "elapsed_s")  # timing and hardware (train/logs.py)
DEFAULT_RTOL = 1e-3  # across backends, versions, CPUs and on accelerators
FINGERPRINTED = {"data.train": "data.train.path", "data.eval": "data.eval.path", "tokenizer": "model.tokenizer"}
CHANGES_NUMERICS = ("backend", "cpu", "devices")  # besides packages.*: differences that change the default rtol


@dataclass(frozen=True)
class Row:
    """One compared value: `metric` at optimisation step `step`, recorded and now (None: no value)."""

    step: int
    metric: str
    recorded: float | None
    now: float | None
    rel_diff: float
    passed: bool


@dataclass(frozen=True)
class Difference:
    """One way the environment (or an input file) differs from the manifest."""

    key: str
    recorded: str
    now: str

    def __str__(self) -> str:
        return f"{self.key}: recorded {self.recorded}, now {self.now}"


@dataclass(frozen=True)
class Relocation:
    """A recorded path that does not exist here, and the file found in its place."""

    key: str
    recorded: str
    found: str


@dataclass
class ReproResult:
    """What `repro` found. `passed`: re-run, and every compared value within `rtol`."""

    run_dir: Path
    rtol: float
    why_rtol: str
    steps: int
    differences: list[Difference]
    relocations: list[Relocation]
    rerun: bool = False
    rows: list[Row] = field(default_factory=list)
    out: Path | None = None  # the kept re-run directory (None: a temporary one, removed)

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.rows if not row.passed]

    @property
    def passed(self) -> bool:
        return self.rerun and bool(self.rows) and not self.failures

    @property
    def first_divergence(self) -> Row | None:
        """The first value (by step, in the recorded order) outside the tolerance."""
        return next(iter(self.failures), None)

    @property
    def largest(self) -> Row | None:
        """The value with the largest relative difference."""
        return max(self.rows, key=lambda row: row.rel_diff, default=None)

    @property
    def max_rel_diff(self) -> float | None:
        return self.largest.rel_diff if self.largest else None


def repro(run_dir: str | Path, steps: int | None = None, rtol: float | None = None, backend: str | None = None,
          strict: bool = False, out: str | Path | None = None) -> ReproResult:
    """Re-run the run stored in `run_dir` and compare (the module docstring). `backend` defaults to the
    manifest's; `strict` stops on any environment difference before compute; `out` keeps the re-run there."""
    from gemma_tune.backend import select_backend
    from gemma_tune.config import load_recipe
    from gemma_tune.environment import environment

    use_console(log)
    run_dir = Path(run_dir)
    recipe, manifest, recorded = read_run(run_dir)
    steps = _steps_to_run(recorded, steps)
    if rtol is not None and not rtol >= 0:
        raise UserError(f"rtol must be >= 0, not {rtol}", where="--rtol")
    out = _checked_out(out, run_dir)
    relocations = relocate(recipe, run_dir)
    backend = select_backend(backend or manifest.get("backend"))
    recipe.update(backend=backend, export={**(recipe.get("export") or {}), "formats": []})
    loaded = load_recipe(recipe)  # one that no longer validates is bad input: found before the environment
    now = environment(backend)
    differences = environment_differences(manifest, recipe, now)
    chosen, why = (rtol, f"rtol {rtol:g} as given") if rtol is not None else default_rtol(differences, now)
    result = ReproResult(run_dir, chosen, why, steps, differences, relocations, out=out)
    for difference in differences:
        log.log(logging.ERROR if strict else logging.WARNING, "environment differs: %s", difference)
    if strict and differences:
        return result
    log.info("re-running %d steps of %s on %s; tolerance: %s", steps, run_dir, backend, why)
    result.rows = compare(recorded, rerun(loaded, steps, out), steps, chosen)
    result.rerun = True
    return result


# ---- the stored run ------------------------------------------------------------------------------------------
def read_run(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    """(resolved recipe, manifest, metrics rows) of a stored run; a UserError when one is missing or damaged."""
    if not is_run_dir(run_dir):
        raise UserError("not a run directory: it has no recipe.yaml and manifest.json (what every run writes)",
                        where=str(run_dir))
    recipe = _read(run_dir / "recipe.yaml", yaml.safe_load)
    manifest = _read(run_dir / "manifest.json", json.loads)
    recorded = read_metrics(run_dir / "metrics.jsonl")
    if not recorded:
        raise UserError("no metrics rows: there is nothing to compare with", where=str(run_dir / "metrics.jsonl"))
    return recipe, manifest, recorded


def _read(path: Path, parse) -> dict:
    try:
        loaded = parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise UserError(f"unreadable: {e}", where=str(path)) from None
    if not isinstance(loaded, dict):
        raise UserError("expected a mapping", where=str(path))
    return loaded


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (`gemma_tune.train.logs`); a missing or damaged file is a UserError."""
    if not path.is_file():
        raise UserError("no metrics.jsonl: the run logged no metrics to compare with", where=str(path))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or "split" not in row:
            raise UserError("not a metrics row ({\"step\": int, \"split\": ..., metrics})", where=f"{path}:{number}")
        rows.append(row)
    return rows


def _steps_to_run(recorded: list[dict], steps: int | None) -> int:
    """`steps`, else the last recorded step; from the first recorded step (something to compare) to the last."""
    first, last = min(row["step"] for row in recorded), max(row["step"] for row in recorded)
    if steps is None:
        return last
    if not first <= steps <= last:
        raise UserError(f"the run recorded metrics at steps {first} to {last}: give a number of steps from {first} "
                        f"to {last}", where="--steps")
    return steps


def _checked_out(out: str | Path | None, run_dir: Path) -> Path | None:
    """`out` as a path, refused when it is the stored run directory or inside it (never written to)."""
    if out is None:
        return None
    out, stored = Path(out).resolve(), run_dir.resolve()
    if out == stored or stored in out.parents:
        raise UserError(f"the re-run would write into the stored run {stored}: choose a directory outside it",
                        where="--out")
    return out


# ---- relocation ----------------------------------------------------------------------------------------------
def relocate(recipe: dict, run_dir: Path) -> list[Relocation]:
    """Replace each recorded absolute path of `PATH_KEYS` that does not exist here by the file found for it
    (`find_relocated`), in `recipe`; the relocations, each logged. Found nowhere: a UserError."""
    roots = search_roots(run_dir)
    relocations = []
    for key in PATH_KEYS:
        recorded = get_key(recipe, key)
        if not isinstance(recorded, str) or is_remote(recorded) or not Path(recorded).is_absolute() \
                or Path(recorded).exists():
            continue
        found = find_relocated(recorded, roots)
        if found is None:
            raise UserError(f"{key} = {recorded} does not exist here, and no trailing part of that path was found "
                            "under the current directory, the run directory's parents or the bundled files",
                            where=str(run_dir / "recipe.yaml"))
        set_key(recipe, key, str(found))
        relocations.append(Relocation(key, recorded, str(found)))
        log.info("relocated %s: %s -> %s", key, recorded, found)
    return relocations


def search_roots(run_dir: Path) -> list[Path]:
    """Where relocated paths are looked for, in order: the current directory, the run directory's parents
    (nearest first), the bundled files."""
    roots = [Path.cwd(), *run_dir.absolute().parents, BUNDLED]
    return list(dict.fromkeys(roots))


def find_relocated(recorded: str, roots: list[Path]) -> Path | None:
    """The first existing `root / suffix`, for the trailing parts of `recorded` from the longest to its name
    alone, each tried under every root in order; None when none exists."""
    parts = Path(recorded).parts[1:]
    for start in range(len(parts)):
        suffix = Path(*parts[start:])
        for root in roots:
            if (root / suffix).exists():
                return (root / suffix).resolve()
    return None


# ---- environment ---------------------------------------------------------------------------------------------
def environment_differences(manifest: dict, recipe: dict, now: dict) -> list[Difference]:
    """How `now` (`environment(backend)`) and the files `recipe` reads differ from `manifest`: package versions
    (`packages.<name>`), cpu, devices, backend, seed and the fingerprints of data.train, data.eval, tokenizer."""
    recorded_packages, packages = manifest.get("packages") or {}, now["packages"]
    pairs = [(f"packages.{name}", recorded_packages.get(name), packages.get(name))
             for name in dict.fromkeys([*recorded_packages, *packages])]
    pairs += [("cpu", manifest.get("cpu"), now["cpu"]),
              ("devices", _devices(manifest.get("devices") or []), _devices(now["devices"])),
              ("backend", manifest.get("backend"), now["backend"]),
              ("seed", manifest.get("seed"), recipe.get("seed"))]
    pairs += [(name, _contents(_recorded_fingerprint(manifest, name)), _contents(fingerprint(path)))
              for name, key in FINGERPRINTED.items() if (path := get_key(recipe, key))]
    return [Difference(key, _shown(before), _shown(after)) for key, before, after in pairs if before != after]


def _devices(devices: list) -> str:
    """Devices as `kind: name`, comma-separated (memory is not compared)."""
    return ", ".join(f"{d.get('kind')}: {d.get('name')}" if isinstance(d, dict) else str(d) for d in devices)


def _recorded_fingerprint(manifest: dict, name: str) -> dict | None:
    return (manifest.get("data") or {}).get(name.split(".")[1]) if name.startswith("data.") else manifest.get(name)


def _contents(fingerprint: dict | None) -> str | None:
    """A fingerprint without its `source` (a relocated file is the same when its contents are)."""
    if not fingerprint or "sha256" not in fingerprint:
        return None
    return f"sha256 {fingerprint['sha256'][:16]}… ({fingerprint['files']} files, {fingerprint['bytes']} bytes)"


def _shown(value: Any) -> str:
    return "(none)" if value is None else str(value)


def default_rtol(differences: list[Difference], now: dict) -> tuple[float, str]:
    """(rtol, why): 0 on the recorded backend, CPU, devices and package versions, on CPUs; else DEFAULT_RTOL."""
    reasons = [str(d) for d in differences if d.key in CHANGES_NUMERICS or d.key.startswith("packages.")]
    accelerators = [f"{d['kind']}: {d['name']}" for d in now["devices"] if d["kind"] != "cpu"]
    if accelerators:
        reasons.append(f"runs on an accelerator ({', '.join(accelerators)}), whose kernels may order sums "
                       "differently from run to run")
    if not reasons:
        return 0.0, ("rtol 0 (bit-identical): the recorded backend, CPU, devices and package versions, on CPUs, "
                     "compute the same bits")
    return DEFAULT_RTOL, f"rtol {DEFAULT_RTOL:g}, as " + "; ".join(reasons)


# ---- the re-run ----------------------------------------------------------------------------------------------
def rerun(recipe: Recipe, steps: int, out: Path | None) -> list[dict]:
    """Train `recipe` from scratch with `gemma_tune.run` for its first `steps` steps in `out` (else a
    temporary directory, removed afterwards); the metrics rows it logged."""
    if out is not None:
        return _train_rows(recipe, steps, out)
    temporary = Path(tempfile.mkdtemp(prefix="gemma-tune-repro-"))
    try:
        return _train_rows(recipe, steps, temporary / "run")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _train_rows(recipe: Recipe, steps: int, run_dir: Path) -> list[dict]:
    from gemma_tune.runner import run

    recipe.output_dir = str(run_dir)
    run(recipe, resume=False, callbacks=[stop_after(steps, recipe.train.grad_accum)])
    return read_metrics(run_dir / "metrics.jsonl")


def stop_after(steps: int, accum: int):
    """A Keras callback ending `fit` after optimisation step `steps` (after the run's own callbacks have
    logged, evaluated and saved that step)."""
    from gemma_tune.train.callbacks import StepCallback

    class StopAfter(StepCallback):
        def on_step_end(self, step, stats):
            if step >= steps:
                self.model.stop_training = True

    return StopAfter(accum=accum)


# ---- comparison ----------------------------------------------------------------------------------------------
def compared_metrics(row: dict) -> list[str]:
    """The metrics of a recorded row that are compared: numeric (or null) values but `EXCLUDED_METRICS`."""
    return [key for key, value in row.items() if key not in ("step", "split", *EXCLUDED_METRICS)
            and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))]


def metric_name(split: str, metric: str) -> str:
    """Train metrics by name, others as `<split>_<name>` (as `RunResult.history` names them)."""
    return metric if split == "train" else f"{split}_{metric}"


def relative_difference(recorded: float | None, now: float | None) -> float:
    """|now − recorded| / max(|recorded|, 1e-12); 0 when both are None, infinite when only one is."""
    if recorded is None or now is None:
        return 0.0 if recorded is now else math.inf
    return abs(now - recorded) / max(abs(recorded), 1e-12)


def compare(recorded: list[dict], now: list[dict], steps: int, rtol: float) -> list[Row]:
    """A `Row` for every compared metric of every recorded row up to `steps`, in the recorded order. A row or
    metric missing from `now` fails."""
    again = {(row["split"], row["step"]): row for row in now}
    rows = []
    for row in (r for r in recorded if r["step"] <= steps):
        counterpart = again.get((row["split"], row["step"]))
        for metric in compared_metrics(row):
            present = counterpart is not None and metric in counterpart
            value = counterpart[metric] if present else None
            diff = relative_difference(row[metric], value) if present else math.inf
            rows.append(Row(row["step"], metric_name(row["split"], metric), row[metric], value, diff, diff <= rtol))
    return rows


# ---- the report ----------------------------------------------------------------------------------------------
def report(result: ReproResult, all_rows: bool = False) -> str:
    """The table (every compared step of `loss` and every failing row; every row with `all_rows`), the first
    divergence, the largest difference and the verdict."""
    if not result.rerun:
        return (f"not reproduced: the environment differs from the recorded one ({len(result.differences)} "
                "differences, above) and --strict is set: nothing was re-run")
    shown = [row for row in result.rows if all_rows or row.metric == "loss" or not row.passed]
    lines = [f"tolerance: {result.why_rtol}", f"{'step':>6}  {'metric':<24} {'recorded':>16} {'now':>16} "
             f"{'rel diff':>9}"]
    lines += [_table_line(row) for row in shown]
    if result.first_divergence is not None:
        lines.append(f"first divergence: {_describe(result.first_divergence)}")
    if result.largest is not None:
        lines.append(f"largest difference: {_describe(result.largest)}")
    steps = len({row.step for row in result.rows})
    if result.passed:
        lines.append(f"reproduced: {len(result.rows)} values at {steps} steps within rtol {result.rtol:g}")
    else:
        lines.append(f"NOT reproduced: {len(result.failures)} of {len(result.rows)} values at {steps} steps outside "
                     f"rtol {result.rtol:g}")
    return "\n".join(lines)


def _table_line(row: Row) -> str:
    mark = "" if row.passed else "  <- outside rtol"
    return (f"{row.step:>6}  {row.metric:<24} {_number(row.recorded):>16} {_number(row.now):>16} "
            f"{row.rel_diff:>9.2e}{mark}")


def _describe(row: Row) -> str:
    return (f"step {row.step} {row.metric}: recorded {_number(row.recorded)}, now {_number(row.now)} "
            f"(relative difference {row.rel_diff:.3g})")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.10g}"
