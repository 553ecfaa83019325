"""`train(recipe, run_dir, resume)`: one run of the recipe's tuning method in Keras' `fit`, from the model
to the exports. The method (`gemma_tune.methods`) says how batches are counted, what the forward pass
yields, what is logged and which layers it adds; everything here is the same for every method.

Steps: hold the run directory (`gemma_tune.rundir.RunDirectory`: lock, stale temporaries removed; on a
multi-host job process 0 holds it, the others a scratch directory of their own: gemma_tune.distribute.hosts) ->
decide whether to continue or start afresh (resume.py, before anything is built) -> build the model
and tokenizer (build.py) -> prepare the data -> optimiser and schedule (optim.py) -> restore the
checkpoint when continuing (checkpoint.py) -> commit the run directory (only now: the previous run's
results moved aside on a fresh start, recipe.yaml and manifest.json written) -> `fit` over
`(total − done) · grad_accum` micro-batches with the callbacks (callbacks.py) -> exports per
`export.formats` into `run_dir/exports/<fmt>/` -> loss curve, summary.json.

A problem found before the commit (a bad data row, a failed download, a refused resume) leaves the run
directory as it was. A run stopped by SIGTERM/SIGINT saves a checkpoint and raises
`TrainingInterrupted` (a KeyboardInterrupt: the CLI exits with code 130); running the same command again
continues it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from pathlib import Path

from gemma_tune.distribute.hosts import agree, is_writer, process_count
from gemma_tune.errors import ConfigError
from gemma_tune.rundir import RunDirectory, atomic_write_text

log = logging.getLogger("gemma_tune")
REFUSED, FROM_SCRATCH = -2, -1  # what the writer tells the other hosts instead of a checkpoint's step


SAMPLE_FILES = ("samples.jsonl", "completions.jsonl")  # rows with a "step", cut back to the step a resume starts at


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on request after saving a checkpoint."""


def total_steps(train, split, method) -> int:
    """Optimisation steps of the run: `max_steps`, else ⌈epochs · optimisation steps per epoch⌉ (the method's
    `steps_per_epoch`: micro-batches per epoch / grad_accum, or online RL's rounds × iterations)."""
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * method.steps_per_epoch(split, train)))


def train(recipe, run_dir=None, resume: bool | None = None, callbacks=()) -> dict:
    """Train per `recipe` in `run_dir` (default: `recipe.output_dir`); returns {"history", "exports":
    {fmt: path}, "summary"}. `resume`: None = continue when the directory holds this run's checkpoint,
    True = require one (other optimisation settings allowed), False = start afresh (train/resume.py).

    `callbacks`: extra Keras callbacks, called after the run's own ones (micro-batch granularity).
    """
    import keras

    from gemma_tune.distribute.setup import active, distribution_for

    placement = distribution_for(recipe)  # a mesh the devices cannot make fails here, before the directory is held
    target = Path(run_dir if run_dir is not None else recipe.output_dir)
    with _held(target) as held, active(placement):
        return _train(recipe, held, resume, callbacks, keras.backend.backend(), placement, target)


@contextlib.contextmanager
def _held(target: Path):
    """The run directory this process writes: `target`, or on a multi-host job's other processes a scratch one
    of their own for their logs and metrics (gemma_tune.distribute.hosts), removed at the end."""
    if is_writer():
        with RunDirectory.open(target) as held:
            yield held
        return
    with tempfile.TemporaryDirectory(prefix="gemma-tune-host-") as scratch, RunDirectory.open(Path(scratch) / "run") as held:
        yield held


def _agreed_start(held: RunDirectory, recipe, resume, target: Path):
    """Where the run starts (a train/resume.py `Start`), decided by the writer and told to a multi-host job's
    other processes (the checkpoint step they load from `target`, and whether the directory started afresh)."""
    from gemma_tune.train import resume as resuming

    if process_count() == 1:
        return resuming.plan(held, recipe, resume)
    if is_writer():
        try:
            start = resuming.plan(held, recipe, resume)
        except BaseException:
            agree(REFUSED)
            raise
        agree(start.step if start.checkpoint is not None else FROM_SCRATCH)
        agree(int(start.fresh))
        return start
    step = agree(0)
    if step == REFUSED:
        raise ConfigError("process 0 refused to start the run (its log says why)", where=str(target))
    fresh = bool(agree(0))
    if step == FROM_SCRATCH:
        return resuming.Start(fresh=fresh)
    return resuming.Start(checkpoint=target / "checkpoints" / f"step_{step}", step=step, fresh=fresh)


def _train(recipe, held: RunDirectory, resume, callbacks, backend: str, placement, target: Path) -> dict:
    from gemma_tune.data import prepare
    from gemma_tune.environment import devices, report
    from gemma_tune.methods import build_method
    from gemma_tune.models import count_params, trained_model
    from gemma_tune.train import checkpoint, measure
    from gemma_tune.train.build import build_for_recipe
    from gemma_tune.train.compiling import jit_compile_for
    from gemma_tune.train.callbacks import (Checkpointer, Evaluator, MetricsLogger, NonFiniteGuard,
                                            RestoreRNG, StopRequest, Throughput)
    from gemma_tune.train.data import for_fit, no_read_ahead
    from gemma_tune.train.logs import MetricsSink, csv_columns
    from gemma_tune.train.optim import WarmupSchedule, build_optimizer
    from gemma_tune.train.report import plot_loss, write_summary
    from gemma_tune.train.task import MethodTrainer

    run_dir = held.path
    log.info("run %s on %s, %s -> %s", recipe.name, backend, placement.mesh.describe(), run_dir)
    for line in report(backend):
        log.info("%s", line)
    start = _agreed_start(held, recipe, resume, target)
    lm, tokenizer = build_for_recipe(recipe)
    first_device = devices(backend)[0]
    _log_plan(recipe, placement.mesh, backend, lm.architecture, first_device)
    if getattr(placement.distribution, "replicated", None):
        log.info("%d variables replicated: a dimension the mesh's model axis (%d) does not divide (e.g. %s)",
                 len(placement.distribution.replicated), placement.mesh.model, placement.distribution.replicated[0])
    data = prepare(recipe.data, tokenizer, recipe.seed, architecture=lm.architecture)
    method = build_method(recipe)
    steps = total_steps(recipe.train, data.train, method)
    start.check_length(steps, run_dir)
    schedule = WarmupSchedule.for_recipe(recipe.train, steps)
    optimizer = build_optimizer(recipe.train, schedule, loss_scaling=recipe.model.dtype == "float16")
    method.setup(lm, data, run_dir, tokenizer=tokenizer)  # with the starting weights: before a checkpoint is restored
    trainer = MethodTrainer(lm, method, chunk_size=recipe.train.loss_chunk_size, accum=recipe.train.grad_accum)
    trainer.compile(optimizer=optimizer,
                    jit_compile=jit_compile_for(recipe.train.jit_compile, backend, first_device["kind"]))
    trainer.built = True  # the wrapped model is built; nothing of its own to build
    optimizer.build(trainer.trainable_variables)

    done, totals, rng = 0, {"tokens": 0.0, "trained_tokens": 0.0, "seconds": 0.0}, None
    if start.checkpoint is not None:
        state = checkpoint.load(start.checkpoint, trainer)
        done, totals, rng = state["step"], state.get("totals", totals), state.get("rng")
        method.restore(checkpoint.method_state(start.checkpoint), done)
        log.info("resuming from %s (step %d of %d)", start.checkpoint, done, steps)
    held.commit(recipe, backend, fresh=start.fresh)
    method.save(run_dir)
    sink = MetricsSink(run_dir, csv_columns(method))
    if done:
        sink.truncate_after(done)
        for name in SAMPLE_FILES:
            _truncate_samples(run_dir / name, done)
    else:
        sink.reset()
        for name in SAMPLE_FILES:
            (run_dir / name).unlink(missing_ok=True)

    counts = count_params(lm)
    device = measure.accelerator()
    t = recipe.train
    kw = {"accum": t.grad_accum, "first_step": done}
    throughput = Throughput(measure.flops_per_token(counts["total"], counts["trainable"], lm.architecture,
                                                    recipe.data.max_length),
                            measure.peak_flops(device), **kw)
    stop = StopRequest()

    def state_for(step: int) -> dict:
        now = throughput.summary()
        return {"data": {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "seed": recipe.seed,
                         "next_micro_batch": step * t.grad_accum},
                "totals": {"tokens": totals["tokens"] + now["tokens"],
                           "trained_tokens": totals["trained_tokens"] + now["trained_tokens"],
                           "seconds": totals["seconds"] + now["seconds"]}}

    checkpointer = Checkpointer(run_dir, t.save_every, steps, state_for, stop, method_state=method.state, **kw)
    logger = MetricsLogger(sink, schedule, steps, t.log_every, throughput, method, **kw)
    own = [RestoreRNG(rng)] if rng else []
    own += [NonFiniteGuard(run_dir, **kw), throughput, logger,
           Evaluator(data.eval, t.batch_size, sink, t.eval_every, steps, lm=lm, tokenizer=tokenizer,
                     prompts=t.sample_prompts, run_dir=run_dir, **kw),
           checkpointer]
    try:
        if done < steps:
            log.info("training %d steps (%d to go) of batch %d x %d accumulated, %d tokens each row", steps,
                     steps - done, t.batch_size, t.grad_accum, recipe.data.max_length)
            batches = method.train_stream(trainer, data.train, batch_size=t.batch_size, accum=t.grad_accum,
                                          seed=recipe.seed, start_step=done, total_steps=steps)
            with stop, no_read_ahead(method.on_policy):
                trainer.fit(for_fit(batches), steps_per_epoch=(steps - done) * t.grad_accum, epochs=1,
                            verbose=0, shuffle=False, callbacks=own + method.callbacks() + list(callbacks))
        else:
            log.info("the run is already complete (step %d of %d): nothing left to train", done, steps)
    finally:
        logger.close()
        sink.close()

    interrupted = checkpointer.stopped_at is not None
    exports = {} if interrupted else _export(recipe, trained_model(lm, trainer.heads), tokenizer, run_dir)
    curve = plot_loss(sink.rows, run_dir / "loss_curve.png", method.loss_label, key=method.curve)
    summary = _summary(recipe, run_dir, steps, checkpointer.stopped_at or max(done, steps),
                       checkpointer.saved or start.checkpoint, throughput, sink, totals, exports, device,
                       data.stats, curve, method)
    print(write_summary(summary, run_dir), flush=True)
    if interrupted:
        message = (f"stopped at step {checkpointer.stopped_at} on request; checkpoint {checkpointer.saved}; "
                   "run the same command again to continue")
        log.warning(message)
        raise TrainingInterrupted(message)
    return {"history": sink.history(), "exports": exports, "summary": summary}


def _log_plan(recipe, mesh, backend: str, architecture, device: dict) -> None:
    """The memory plan's one-line summary (gemma_tune.plan) before training starts, and its warning when the
    accelerator's memory is known and the plan does not fit it (a CPU's memory is the host's: no warning);
    `device` is the first of `gemma_tune.environment.devices(backend)`."""
    from gemma_tune.plan import estimate

    accelerator = device["kind"] in ("gpu", "tpu")
    plan = estimate(recipe, mesh, architecture, platform=device["kind"] if accelerator or backend == "jax" else None)
    log.info("%s", plan.summary_line())
    warning = plan.warning(device["memory_bytes"]) if accelerator and device["memory_bytes"] else None
    if warning:
        log.warning("%s", warning)


def _truncate_samples(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _export(recipe, model, tokenizer, run_dir: Path) -> dict[str, Path]:
    """`model`: what the run trained (the decoder, or a reward model: decoder and score head)."""
    from gemma_tune.export import export_model, recipe_export_options

    exports = {}
    for fmt in recipe.export.formats:
        target = run_dir / "exports" / fmt
        exports[fmt] = export_model(model, tokenizer, target, fmt, merge_lora=recipe.export.merge_lora,
                                    dtype=recipe.export.dtype, force=True, **recipe_export_options(recipe, fmt))
        log.info("exported %s -> %s", fmt, exports[fmt])
    return exports


def _summary(recipe, run_dir, steps, reached, checkpoint_dir, throughput, sink, totals, exports, device,
             data_stats, curve, method) -> dict:
    import keras

    session = throughput.summary()
    train_rows = [r for r in sink.rows if r["split"] == "train" and r.get("loss") is not None]
    eval_rows = [r for r in sink.rows if r["split"] == "eval"]
    return {
        "name": recipe.name, "method": recipe.method, "run_dir": str(run_dir),
        "status": "finished" if reached >= steps else "interrupted",
        "steps": reached,
        "total_steps": steps, "backend": keras.backend.backend(), "device": device or "cpu",
        "tokens": totals["tokens"] + session["tokens"],
        "trained_tokens": totals["trained_tokens"] + session["trained_tokens"],
        "seconds": session["seconds"], "tokens_per_s": session["tokens_per_s"], "mfu": session["mfu"],
        "peak_memory_gib": session["peak_memory_gib"], "peak_memory_of": session["peak_memory_of"],
        "first_loss": train_rows[0]["loss"] if train_rows else None,
        "final_loss": train_rows[-1]["loss"] if train_rows else None,
        "curve": method.curve,  # the quantity of loss_curve.png; its first and last train values:
        "first_metrics": {k: train_rows[0].get(k) for k in method.metrics} if train_rows else None,
        "final_metrics": {k: train_rows[-1].get(k) for k in method.metrics} if train_rows else None,
        "eval": eval_rows[-1] if eval_rows else None,
        "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
        "exports": {fmt: str(path) for fmt, path in exports.items()},
        "loss_curve": str(curve) if curve else None,
        "data": data_stats,
    }
