"""What the backward of one torch training step keeps, eager and compiled, with and without block remat.

For the 9.9M-parameter Gemma 3 of bench/RESULTS.md (`$A`: hidden 256, 6 layers, 4 heads, 1 key/value head),
LoRA r16 on q,v, float32, one packed row of `--length` tokens, plain attention: the SFT trainer's forward and
loss (`MethodTrainer(..., training=True)`), then `backward()`. "kept" is the bytes of the distinct storages the
forward hands autograd to keep for the backward (`torch.autograd.graph.saved_tensors_hooks`; a rematerialised
block's insides are recomputed, so only its inputs count). Each mode runs in its own process:

    eager          the eager step
    eager-remat    the eager step, each block under keras.remat (torch.utils.checkpoint)
    compiled       torch.compile of the forward (its backward compiled by AOTAutograd)
    compiled-remat the same with train.remat: blocks traced whole, AOTAutograd's activation memory budget 0
                   (gemma_tune.models.remat, gemma_tune.train.compiling)

The step is run once eagerly first (as the trainer's first call is), then `--steps` times; "step s" is the
last one's wall time. One JSON line per mode on stdout (and appended to --out).

    KERAS_BACKEND=torch python bench/torch_remat.py [--length 2048] [--out bench/raw/FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("eager", "eager-remat", "compiled", "compiled-remat")


def measure(mode: str, length: int, steps: int) -> dict:
    import numpy as np
    import torch

    from gemma_tune.backend import set_random_seed
    from gemma_tune.config.presets import preset_architecture
    from gemma_tune.methods.sft import SFT
    from gemma_tune.models import build_model, enable_lora
    from gemma_tune.train.compiling import eager_first_call
    from gemma_tune.train.task import MethodTrainer
    from workload import random_packed_rows

    set_random_seed(0)
    arch = preset_architecture("gemma3_1b", hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=4,
                               num_kv_heads=1, head_dim=64, query_pre_attn_scalar=64, vocab_size=16384,
                               sliding_window=128)
    lm = build_model(arch, attention_implementation="plain")
    enable_lora(lm, 16, 16, targets=["q", "v"])
    lm.remat = mode.endswith("remat")
    trainer = MethodTrainer(lm, SFT(recipe=None, options={}), chunk_size=1024)
    trainer.built = True
    rows = random_packed_rows(1, length, arch.vocab_size, 0)
    batch = {k: torch.as_tensor(np.asarray(v)) for k, v in rows.items()}
    batch["step_targets"] = torch.full((1,), float(np.asarray(rows["loss_mask"]).sum()))

    def forward(batch):
        return trainer(batch, training=True)["loss"]

    step = forward
    if mode.startswith("compiled"):
        step = eager_first_call(torch.compile(forward), recompute=lm.remat)
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    step(batch).backward()  # eager (the first call)
    for _ in range(steps):
        kept.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = step(batch)
        loss.backward()
        seconds = time.perf_counter() - start
    return {"mode": mode, "length": length, "loss": float(loss), "kept_mib": round(sum(kept.values()) / 2**20, 1),
            "step_s": round(seconds, 3), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=None, help="append the JSON lines here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.length, args.steps)), flush=True)
        return 0
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    failed = 0
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--length", str(args.length),
                               "--steps", str(args.steps)], env=env, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else json.dumps(
            {"mode": mode, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
        failed += done.returncode != 0
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
