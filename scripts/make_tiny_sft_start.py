"""Writes data/tiny/sft_start/: the starting model of the GRPO quickstart (recipes/quickstart_grpo.yaml).

It is the SFT quickstart's merged safetensors export after 150 steps on JAX — what README's first commands
leave in runs/quickstart/exports/safetensors — bundled so that the GRPO quickstart (and its test) need not run
the SFT one first. Run from the project root: KERAS_BACKEND=jax python scripts/make_tiny_sft_start.py
"""

import shutil
import tempfile
from pathlib import Path

import gemma_tune

TARGET = Path("data/tiny/sft_start")


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        result = gemma_tune.run("recipes/quickstart.yaml", overrides=[f"output_dir={scratch}/quickstart",
                                                                      "train.max_steps=150"])
        export = result.exports["safetensors"]
        shutil.rmtree(TARGET, ignore_errors=True)
        TARGET.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                     "special_tokens_map.json", "generation_config.json"):
            shutil.copy2(Path(export) / name, TARGET / name)
    print(f"SFT quickstart export -> {TARGET}")


if __name__ == "__main__":
    main()
