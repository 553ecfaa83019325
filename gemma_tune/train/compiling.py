"""Whether the train step is compiled (`train.jit_compile`), and how a compiled torch step compiles once.

`jit_compile_for(setting, backend, device_kind)`: `true`/`false` as given; `auto` is Keras' choice on JAX and
TensorFlow (XLA where the model supports it) and, on torch, `torch.compile` where the step runs on a GPU and
eager on a CPU — Keras' own "auto" is always eager on torch. On a CPU compiling costs minutes of the
compiler's time (79 s for the benchmark's 10M-parameter model on 2 cores) while the compiled step saves a
fraction of a second (0.18 s there), so a short run is slower compiled; on a GPU an eager step spends its time
in Keras' and torch's per-operation dispatch, which the compiled graph removes (bench/RESULTS.md,
"torch.compile, one graph").

A compiled torch function (`torch.compile` of Keras' train or test step) is traced by dynamo, which guards on
the Python state the trace read. Keras creates some of that state during the first call: the global layer
call context (`current_call_ctx`), each layer's `_parent_path`, the optimiser's weight-decay cache, and the
trained variables' `.grad` (None until the first backward; the step's `zero_grad` reads it). Traced on the
first call, the step would be guarded on their absence and compile again on the second.
`eager_first_call(function)` runs the first call of a compiled function eagerly — the same step, the same
results — and the compiled function from the second on, when that state is in its steady form: each step
compiles once (tests/test_torch_compile.py trains and evaluates under dynamo's `error_on_recompile`). State
that changes at every call must stay out of the step: `keras.ops.pad` names a new Keras `Operation` each time
(`gemma_tune.methods.padding`). After each compiled call the layer call context is cleared (`end_layer_calls`):
a step through FlexAttention would otherwise leave it set (tests/test_flex_attention.py).

Block remat (`train.remat`) inside a compiled torch step is the compiler's: the blocks are traced whole
(`gemma_tune.models.remat`) and AOTAutograd's partitioner, given an activation memory budget of 0, keeps only
what the backward cannot recompute. For a 6-layer model at 1 × 2048 the backward then holds 38 MiB instead of
994 MiB (eager block remat: 32 MiB; bench/torch_remat.py).
"""

from __future__ import annotations


def jit_compile_for(setting, backend: str, device_kind: str) -> bool | str:
    """What `train.jit_compile` (`setting`: True, False or "auto") hands Keras' `compile` on `backend`, whose
    first device is a `device_kind` ("cpu", "gpu", "tpu"; `gemma_tune.environment.devices`)."""
    if setting != "auto" or backend != "torch":
        return setting
    return device_kind == "gpu"


def eager_first_call(function, recompute: bool = False):
    """`function` unchanged unless it is a `torch.compile`d one; then a function that calls the original,
    uncompiled, the first time and the compiled one after, each compiled call followed by `end_layer_calls`
    (module docstring). `recompute` (a model with
    `train.remat`): the compiled function is compiled under an activation memory budget of 0, so the backward
    recomputes the forward's activations rather than keeping them (`gemma_tune.models.remat`)."""
    eager = getattr(function, "_torchdynamo_orig_callable", None)
    if eager is None:
        return function
    calls = [0]

    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return eager(*args, **kwargs)
        try:
            if not recompute:
                return function(*args, **kwargs)
            from torch._functorch import config

            with config.patch(activation_memory_budget=0.0):
                return function(*args, **kwargs)
        finally:
            end_layer_calls()

    return call


def end_layer_calls() -> None:
    """Clears Keras' layer call context, as the outermost layer's call does when it returns: outside a step no
    layer call is in progress. A compiled step can leave it set: torch 2.13's dynamo drops the Python attribute
    stores that follow a FlexAttention call in the traced frame when any came before it (the higher-order op's
    subgraph tracing restores a copy of the side effects taken before it), and Keras stores the context before
    the model's layers run and clears it after. Left set, it would give later eager calls the step's `training`
    and fail the next call's guards (a recompile at every step)."""
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("current_call_ctx", None)
