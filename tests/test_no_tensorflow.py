"""On JAX and torch, TensorFlow stays unimported (its import costs seconds and prints start-up lines) along
the paths that do not need it: seeding, data preparation, the training and export packages, building a
LoRA model, the safetensors and peft exports, and the metrics with their TensorBoard events. Each backend runs in a fresh subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, random, sys
import numpy as np
from gemma_tune.backend import set_random_seed

def draws():
    import keras
    return [random.random(), float(np.random.rand()), keras.ops.convert_to_numpy(keras.random.uniform((3,))).tolist()]

set_random_seed(3)
first = draws()
set_random_seed(3)
assert draws() == first, "seeding is not reproducible"
import keras
if keras.backend.backend() == "torch":
    import torch
    assert torch.initial_seed() == 3

import gemma_tune.train, gemma_tune.export, gemma_tune.loading, gemma_tune.generate
from gemma_tune.config.presets import preset_architecture
from gemma_tune.config.schema import DataSection
from gemma_tune.data import prepare
from gemma_tune.export import export_model
from gemma_tune.models import build_model, enable_lora
from gemma_tune.tokenizer import load_tokenizer

tok = load_tokenizer("data/tiny/tokenizer.model")
data = DataSection(train={"path": "data/tiny/chat_eval.jsonl", "format": "chat"}, max_length=64, eval_fraction=0.1)
prepare(data, tok, seed=0, cache_dir=sys.argv[1] + "/cache")
model = build_model(preset_architecture("gemma3_tiny", num_layers=2), dtype="float32")
enable_lora(model, rank=2, alpha=4)
for fmt in ("safetensors", "peft"):
    export_model(model, tok, sys.argv[1] + "/" + fmt, fmt)
from pathlib import Path
from gemma_tune.train.logs import MetricsSink
(Path(sys.argv[1]) / "run").mkdir()
sink = MetricsSink(Path(sys.argv[1]) / "run", ("step", "split", "loss"))  # with its TensorBoard event file
sink.write({"step": 1, "split": "train", "loss": 1.0})
sink.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_text", "keras_hub"))))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_tensorflow_is_not_imported_on_other_backends(tmp_path, backend):
    env = {**os.environ, "KERAS_BACKEND": backend}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert "cudart_stub.cc" not in done.stderr and "oneDNN" not in done.stderr
