"""The model that Keras' `fit` trains: a GemmaCausalLM and the layers its tuning method adds, whose
forward pass yields the method's statistics rather than logits.

`call(batch)` is the method's `forward` (`gemma_tune.methods.base.Method`): `{"loss", *stats}` for the
micro-batch; `compute_loss` returns `loss · accum` (Keras averages the gradients of the `accum`
micro-steps of an accumulation step, and each micro-loss is already divided by the whole step's count,
so the applied gradient is that of the step's objective); `compute_metrics` hands the statistics to the
callbacks unchanged. The train step itself is Keras' own on every backend; compiled on torch, its first call
runs eagerly so that it compiles once (`gemma_tune.train.compiling.eager_first_call`).

Batches are the data contract's dicts plus `step_<count>` [B] for each of the method's counts (every
entry that count over the optimisation step the micro-batch belongs to; see `gemma_tune.train.data`).
"""

from __future__ import annotations

import keras

from gemma_tune.train.compiling import eager_first_call


class MethodTrainer(keras.Model):
    """Trains `lm` (a GemmaCausalLM) with `method`; see the module docstring. `heads` are the method's
    layers (`method.layers(lm)`), by name."""

    def __init__(self, lm, method, *, chunk_size: int = 1024, accum: int = 1, name: str = "trainer", **kwargs):
        super().__init__(name=name, **kwargs)
        self.lm, self.method = lm, method
        self.heads = method.layers(lm)
        self.chunk_size = chunk_size
        self.accum = accum

    @property
    def model_variables(self) -> list:
        """What a checkpoint holds: the decoder's variables, then those of the method's layers."""
        return list(self.lm.variables) + [v for layer in self.heads.values() for v in layer.variables]

    def call(self, batch, training=False):
        return self.method.forward(self, batch, training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return y_pred["loss"] * self.accum if training else y_pred["loss"]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return dict(y_pred)

    def make_train_function(self, force=False):
        made = self.train_function is None or force
        function = super().make_train_function(force)
        if made:
            self.train_function = eager_first_call(self.train_function, recompute=self.lm.remat)
        return function

    def make_test_function(self, force=False):
        made = self.test_function is None or force
        function = super().make_test_function(force)
        if made:
            self.test_function = eager_first_call(self.test_function)
        return function
