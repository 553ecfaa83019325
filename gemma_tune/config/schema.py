"""The recipe schema: every key a recipe may hold, its type, default and allowed range.

The keys of ../shared/design/RECIPES.md are a contract; this module is where each is declared (search
for a key's name here to find its meaning). Unknown keys are errors (`extra="forbid"`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
METHODS = ("sft",)  # dpo, ipo, simpo, orpo and reward arrive with preference tuning
PLANNED_METHODS = ("dpo", "ipo", "simpo", "orpo", "reward")
DATA_FORMATS = ("text", "prompt_completion", "chat", "preference")
PLANNED_DATA_FORMATS = ("image_text",)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    preset: str | None = Field(default=None, description="an architecture from configs/models/<preset>.yaml")
    architecture: dict[str, Any] | None = Field(
        default=None, description="fields of gemma_tune.models.config.Architecture overriding the preset's")
    weights: str | None = Field(
        default=None, description="hf://ORG/NAME, kaggle://HANDLE, a local HF checkpoint dir, a keras-hub preset "
        "dir, a gemma_tune run dir or export; null = random init")
    tokenizer: str | None = Field(default=None, description="a SentencePiece .model file; null = from `weights`")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="compute dtype; trainable weights stay float32 when it is 16-bit")


class LoraSection(Section):
    rank: int = Field(default=16, gt=0)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1)


class DataSource(Section):
    path: str = Field(description="a local file or directory (jsonl/json/parquet/csv) or a hub dataset "
                                  "(hf://ORG/NAME or ORG/NAME)")
    format: str = Field(description="text | prompt_completion | chat | preference")
    split: str | None = Field(default=None, description="dataset split (hub datasets); default 'train'")
    subset: str | None = Field(default=None, description="dataset configuration name (hub datasets)")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="remap columns: {expected_name: name_in_the_data}")
    template: Literal["chat", "none"] = Field(
        default="chat", description="prompt_completion: render as a chat turn pair, or concatenate raw")


class DataSection(Section):
    train: DataSource
    eval: DataSource | None = None
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0,
                                 description="share of train carved off (by seed) as eval when `eval` is absent")
    max_length: int = Field(default=2048, gt=1)
    packing: bool = True
    loss_on: Literal["completion", "all"] = "completion"
    truncation: Literal["right", "left", "drop"] = "right"
    skip_invalid: bool = Field(default=False, description="skip rows that don't fit the format (counted) "
                                                          "instead of stopping")
    num_proc: int | None = Field(default=None, gt=0, description="tokenisation processes; null = by CPU count")


class TrainSection(Section):
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    optimizer: Literal["adamw", "adafactor", "sgd"] = "adamw"
    learning_rate: float = Field(default=2.0e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    remat: bool = False
    eval_every: int | None = Field(default=None, gt=0)
    save_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=10, gt=0)
    loss_chunk_size: int = Field(default=1024, gt=0, description="tokens per chunk of the chunked loss")
    jit_compile: bool | Literal["auto"] = "auto"
    sample_prompts: list[str] = Field(default_factory=list,
                                      description="prompts sampled at each eval into the run directory")

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class PreferenceSection(Section):
    beta: float = Field(default=0.1, gt=0)
    gamma: float = Field(default=0.5, ge=0, description="SimPO target margin (absolute, not gamma/beta)")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class ExportSection(Section):
    formats: list[Literal["keras", "safetensors", "peft"]] = Field(default_factory=list)
    merge_lora: bool = True
    dtype: Literal["float32", "bfloat16"] | None = Field(default=None, description="null = the model's dtype")


class Recipe(Section):
    name: str = Field(min_length=1)
    description: str | None = None
    backend: Literal["jax", "tensorflow", "torch"] | None = Field(
        default=None, description="null = KERAS_BACKEND from the environment, else jax; CLI --backend wins")
    seed: int = 0
    output_dir: str | None = Field(default=None, description="the run directory; null = runs/<name>")
    model: ModelSection
    method: str = "sft"
    lora: LoraSection | None = None
    quantize: Literal["int8", "int4"] | None = None
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    export: ExportSection = Field(default_factory=ExportSection)
