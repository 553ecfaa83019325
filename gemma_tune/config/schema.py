"""The recipe schema: every key a recipe may hold, its type, default, allowed range and meaning.

Each key is declared here with a `description` that says what it means (units, what null means);
`gemma-tune keys [SECTION]` prints them all (`gemma_tune.config.keys.describe_keys`). The key names and
meanings are a contract that recipes, tests and users rely on: rename none without keeping the old name
working. Unknown keys are errors (`extra="forbid"`); checks that span keys (files, backends, methods)
are in `gemma_tune.config.validate`. `base:` (composition) is read before this schema applies
(`gemma_tune.config.compose`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gemma_tune.methods import METHODS

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DATA_FORMATS = ("text", "prompt_completion", "chat", "preference", "image_text", "prompt")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    preset: str | None = Field(
        default=None, description="an architecture from configs/models/<preset>.yaml (`gemma-tune list` shows "
        "them); null = the architecture of model.weights, or model.architecture alone")
    architecture: dict[str, Any] | None = Field(
        default=None, description="fields of gemma_tune.models.config.Architecture (num_layers, hidden_size, ...) "
        "overriding the preset's, or the whole architecture without a preset; null = the preset's as is")
    weights: str | None = Field(
        default=None, description="the starting weights: hf://ORG/NAME, kaggle://HANDLE, a local HF checkpoint "
        "dir, a keras-hub preset dir, a gemma_tune run dir or export; null = random init (then model.tokenizer "
        "is required)")
    tokenizer: str | None = Field(
        default=None, description="a SentencePiece .model file (or an HF / keras-hub dir, hf://, kaggle:// holding "
        "one); null = the tokenizer beside model.weights")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="compute dtype; trainable weights stay float32 when it is 16-bit (with "
        "LoRA the frozen base is stored in bfloat16); float16 scales the loss and does not train with JAX on a "
        "CPU; float32 for exactness tests")
    train_vision: Literal["none", "projector", "all"] = Field(
        default="none", description="vision models (PaliGemma, Gemma 3 4B+): what of the image side trains besides "
        "the decoder — none (SigLIP and its projector frozen, as the references tune them), projector (the "
        "projection into the decoder, and Gemma 3's soft-token norm), all (the SigLIP encoder too); ignored for "
        "text models")


class LoraSection(Section):
    rank: int = Field(default=16, gt=0, description="LoRA rank r: each adapted [in, out] kernel W gets factors "
                                                    "A [in, r] and B [r, out]")
    alpha: float = Field(default=32.0, gt=0, description="LoRA scale: the kernel computes W + (alpha / rank) · A·B")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0,
                           description="dropout probability on the adapters' input while training; 0 = none")
    targets: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1,
        description="projections that get adapters: q, k, v, o (attention query, key, value, output) and gate, "
        "up, down (MLP)")


class DataSource(Section):
    path: str = Field(description="a local file or directory (jsonl/json/parquet/csv; a directory's files all of "
                                  "one kind, none leading outside it; a relative path is looked up in the working "
                                  "directory, the recipe's, then the project's) or a hub dataset (hf://ORG/NAME or "
                                  "ORG/NAME)")
    format: str = Field(description="text | prompt_completion | chat | preference | image_text | prompt: the "
                                    "columns each row holds (text; prompt, completion; messages, whose contents may "
                                    "be lists of {type: text, text} / {type: image, image} parts for vision models; "
                                    "prompt, chosen, rejected; image (a path relative to the data file's directory, "
                                    "bytes, or a list of them), prefix, suffix: vision models only; prompt (a string "
                                    "or messages) alone, for grpo/rloo, whose other columns such as answer go to the "
                                    "reward functions)")
    split: str | None = Field(default=None, description="dataset split to read (hub datasets); null = 'train'")
    subset: str | None = Field(default=None,
                               description="dataset configuration name (hub datasets); null = the default one")
    columns: dict[str, str] = Field(default_factory=dict,
                                    description="rename columns: {expected_name: name_in_the_data}; {} = the "
                                                "data already uses the format's names")
    prefix: str | None = Field(
        default=None, description="image_text only: the prefix of every row (e.g. 'caption en' for a captioning "
        "dataset without a prefix column; the data's prefix column is then not read); null = each row's prefix")
    system: str | None = Field(
        default=None, description="prompt data (grpo/rloo) only: a system message put before every prompt (Gemma's "
        "template writes it at the start of the first user turn), e.g. the answer layout the rewards expect; null = "
        "none (a prompt's own system message is kept either way)")
    template: Literal["chat", "none"] = Field(
        default="chat", description="prompt_completion, and image_text on Gemma 3: chat = render as a user/model "
        "turn pair with Gemma's chat template (the images, then the prefix, in the user turn); none = bos + prompt "
        "+ completion + eos (bos + images + prefix + suffix + eos), concatenated raw. PaliGemma's image_text layout "
        "is always its own: images, bos, prefix, newline, suffix, eos")


class DataSection(Section):
    train: DataSource = Field(description="the training data")
    eval: DataSource | None = Field(default=None, description="the evaluation data; null = none, or a share of "
                                                              "train (eval_fraction)")
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0,
                                 description="share of train rows carved off (by seed) as eval when `eval` is null; "
                                             "0 = no eval split")
    max_length: int = Field(default=2048, gt=1, description="tokens per training row (T); longer sequences are "
                                                            "truncated as `truncation` says")
    packing: bool = Field(default=True, description="true = pack several sequences into each row (attention never "
                                                    "crosses them); false = one sequence per row, padded. Data with "
                                                    "images is never packed (one sequence per row, logged)")
    loss_on: Literal["completion", "all"] = Field(
        default="completion", description="tokens trained on: completion = the model turns (or completions) only; "
        "all = every token")
    truncation: Literal["right", "left", "drop"] = Field(
        default="right", description="a sequence longer than max_length: right = keep its start, left = keep its "
        "end, drop = leave the row out (counted)")
    skip_invalid: bool = Field(default=False, description="skip rows that don't fit the format, or whose image "
                                                          "is missing or not an image (counted, with their row "
                                                          "numbers logged) instead of stopping")
    pan_and_scan: bool = Field(default=False, description="Gemma 3 vision models: also give the model crops of an "
                                                          "image whose aspect ratio is at least 1.2 (2 to 4 crops, "
                                                          "each side at least 256 pixels, as transformers' "
                                                          "Gemma3Processor with do_pan_and_scan), after the whole "
                                                          "image; false = the whole image only")
    num_proc: int | None = Field(default=None, gt=0, description="tokenisation processes; null = 1 up to 1000 rows, "
                                                                 "else the CPU count, at most 4")


class SamplePrompt(Section):
    prompt: str = Field(description="the prompt (PaliGemma: its task prefix, e.g. 'caption en')")
    images: list[str] = Field(default_factory=list, description="image files that go with the prompt")


class TrainSection(Section):
    max_steps: int | None = Field(default=None, gt=0, description="optimisation steps to train; wins over epochs; "
                                                                  "null = as many as `epochs` take")
    epochs: float | None = Field(default=None, gt=0, description="passes over the training rows (fractions allowed), "
                                                                 "used when max_steps is null; null = 1")
    batch_size: int = Field(default=8, gt=0, description="rows of max_length tokens per micro-batch (preference "
                                                         "methods: pairs; grpo/rloo: prompts, each completed "
                                                         "rl.num_generations times)")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches whose gradients are averaged per "
                                                         "optimisation step (effective batch = batch_size × "
                                                         "grad_accum)")
    optimizer: Literal["adamw", "adafactor", "sgd"] = Field(default="adamw", description="the Keras optimizer")
    learning_rate: float = Field(default=2.0e-4, gt=0, description="peak learning rate, reached after warmup_steps")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="learning rate after warmup: constant, or decaying to 0 at the last step "
        "(linear, cosine)")
    warmup_steps: int = Field(default=0, ge=0, description="optimisation steps of linear warmup to learning_rate "
                                                           "(fewer than max_steps); 0 = none")
    weight_decay: float = Field(default=0.0, ge=0, description="decoupled weight decay: each step a weight shrinks "
                                                               "by learning rate × weight_decay × itself (norm "
                                                               "scales and biases excluded); 0 = none")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the global gradient norm to this; "
                                                                       "null = no clipping")
    deterministic: bool = Field(default=False, description="use only deterministic kernels on accelerators "
                                "(JAX: XLA_FLAGS --xla_gpu_deterministic_ops; TensorFlow: enable_op_determinism; "
                                "torch: use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG): the same recipe and seed "
                                "repeat bit for bit on one GPU too, at some speed; on CPUs runs already are")
    remat: bool = Field(default=False, description="recompute each block in the backward pass: less memory, more "
                                                   "compute")
    eval_every: int | None = Field(default=None, gt=0, description="optimisation steps between evaluations (and "
                                                                   "sample_prompts), and at the last step; null = "
                                                                   "at the last step only")
    save_every: int | None = Field(default=None, gt=0, description="optimisation steps between checkpoints (the last "
                                                                   "2 kept); one is also saved at the last step and on "
                                                                   "SIGTERM/SIGINT; null = only those")
    log_every: int = Field(default=10, gt=0, description="optimisation steps between metric rows (metrics.jsonl, "
                                                         "TensorBoard)")
    loss_chunk_size: int = Field(default=1024, gt=0, description="tokens per chunk of the chunked loss: the logits "
                                                                 "of this many tokens exist at once (smaller = less "
                                                                 "memory)")
    jit_compile: bool | Literal["auto"] = Field(default="auto", description="compile the train step (Keras' "
                                                                           "jit_compile: XLA on JAX and TensorFlow, "
                                                                           "torch.compile on torch); auto = XLA where "
                                                                           "Keras chooses it, torch.compile on a GPU "
                                                                           "(eager on a CPU, where compiling takes "
                                                                           "minutes); on torch it also compiles "
                                                                           "online RL's decoding step")
    sample_prompts: list[str | SamplePrompt] = Field(
        default_factory=list, description="prompts completed greedily at each evaluation, written to samples.jsonl "
        "in the run directory: a string, or {prompt, images: [paths]} for a vision model (paths like data paths: "
        "the working directory, the recipe's, then the project's); [] = none")

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class PreferenceSection(Section):
    """Options of the preference methods; each method reads its own keys, and null means its default
    (gemma_tune.methods: METHODS)."""

    beta: float | None = Field(default=None, gt=0, description="dpo/ipo β (default 0.1), simpo β (default 2.0), "
                                                              "orpo λ, the odds-ratio weight (default 0.1)")
    gamma: float | None = Field(default=None, ge=0, description="simpo: the target reward margin γ, absolute "
                                                              "(not γ/β); default 1.0")
    label_smoothing: float | None = Field(default=None, ge=0, lt=0.5,
                                          description="dpo: conservative DPO ε, the share of preference labels "
                                                      "taken as flipped; default 0")
    sft_weight: float | None = Field(default=None, ge=0, description="simpo: weight of the chosen responses' NLL "
                                                                   "added to the loss (CPO's α); default 0")
    reference: str | None = Field(default=None, description="dpo/ipo: the reference model, any source model.weights "
                                  "accepts; null = the starting model (with LoRA: the model with its adapters off)")
    precompute_reference: bool | None = Field(
        default=None, description="dpo/ipo: compute the reference log-probabilities once before training (cached "
        "in the run directory) instead of at every step; null = true for full fine-tuning or a named reference, "
        "false with LoRA and the starting model as reference (adapters off); false needs that case")


class RewardSection(Section):
    """Options of the reward method (null means its default)."""

    center_coefficient: float | None = Field(
        default=None, ge=0, description="reward: weight c of the centering term c·(r_chosen + r_rejected)² added to "
        "each pair's Bradley–Terry loss, pushing scores towards mean 0 (TRL's center_rewards_coefficient; 0.01 is "
        "its suggestion); default 0 = none")


class RewardItem(Section):
    """One reward function of `rl.rewards` (gemma_tune.rewards)."""

    name: str | None = Field(default=None, description="a built-in reward (answer_match, format, length_penalty) or "
                             "a Python function as package.module:function, called as f(prompts, completions, "
                             "**columns) -> one float (or None: not applicable) per completion; null with `model`")
    model: str | None = Field(default=None, description="a reward model instead of a function: a method: reward run "
                              "or export, or any sequence classifier `gemma-tune score` reads; null with `name`")
    weight: float = Field(default=1.0, description="the function's weight in the summed reward")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword options of the function (answer_match: "
                                 "column; format: pattern; length_penalty: max_length, buffer); {} = its defaults")

    @model_validator(mode="after")
    def _one_source(self) -> "RewardItem":
        if (self.name is None) == (self.model is None):
            raise ValueError("a reward is either `name` (a built-in or package.module:function) or `model` (a "
                             "reward model), exactly one of them")
        return self


class RLSection(Section):
    """Options of the online RL methods (grpo, rloo); null means the method's default (gemma_tune.methods)."""

    num_generations: int | None = Field(default=None, ge=2, description="completions G sampled per prompt, the "
                                        "group their advantages compare within; default 8")
    max_completion_length: int | None = Field(default=None, gt=0, description="new tokens per completion at most "
                                              "(a completion that reaches it unfinished is `clipped`); default 256")
    temperature: float | None = Field(default=None, gt=0, description="sampling temperature τ; the policy's "
                                      "log-probabilities are those of softmax(logits / τ), as TRL; default 1.0")
    top_p: float | None = Field(default=None, gt=0, le=1, description="nucleus sampling: the smallest set of tokens "
                                "whose probability reaches top_p; default 1.0 = all")
    top_k: int | None = Field(default=None, gt=0, description="sample among the k most likely tokens; null = all")
    beta: float | None = Field(default=None, ge=0, description="weight of the per-token KL to the reference "
                               "(k3 estimator; with LoRA the reference is the model with its adapters off); "
                               "default 0.0 = no reference, as TRL")
    epsilon: float | None = Field(default=None, gt=0, description="clipping ε of the ratio, the lower bound 1 − ε; "
                                  "default 0.2")
    epsilon_high: float | None = Field(default=None, gt=0, description="upper clipping bound 1 + ε_high (DAPO's "
                                       "clip-higher); null = epsilon")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] | None = Field(
        default=None, description="how per-token losses are averaged: grpo = over each completion's tokens, then "
        "over completions; dr_grpo = summed over tokens / (completions × max_completion_length); dapo = over all "
        "completion tokens of the optimisation step; default dapo, as TRL")
    scale_rewards: Literal["group", "batch", "none"] | None = Field(
        default=None, description="grpo: divide advantages by the reward std of the group, of the whole step's "
        "batch, or not at all (Dr. GRPO); default group")
    num_iterations: int | None = Field(default=None, gt=0, description="optimisation steps μ on each batch of "
                                       "completions before sampling again (the ratio is 1 when μ = 1); default 1")
    rewards: list[RewardItem | str] | None = Field(
        default=None, description="reward functions, summed with their weights: a built-in name or "
        "package.module:function as a string, or {name | model, weight, args}; at least one (required)")


class ExportSection(Section):
    formats: list[Literal["keras", "safetensors", "peft", "gguf"]] = Field(
        default_factory=list, description="written into the run's exports/<format>/ after training: keras "
        "(model.keras + keras-hub preset), safetensors (Hugging Face checkpoint), peft (LoRA adapters), gguf "
        "(model.gguf for llama.cpp + an Ollama Modelfile); [] = none")
    merge_lora: bool = Field(default=True, description="fold the LoRA adapters into the exported weights; false "
                                                       "exports the base alone (safetensors; keras refuses; peft "
                                                       "always writes the adapters)")
    dtype: Literal["float32", "bfloat16"] | None = Field(default=None, description="dtype of the exported weights; "
                                                                                   "null = the model's dtype")
    quantize: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "int8", "int4"] | None = Field(
        default=None, description="quantised exports: gguf f32 | f16 | bf16 | q8_0 | q4_0 (null = f32, bf16 with "
        "dtype bfloat16); keras and safetensors int8 | int4 (weights of the projections); peft has none; null = "
        "float weights")


class DistributionSection(Section):
    """How training spreads over devices (gemma_tune.distribution): Keras' distribution API over JAX."""

    mode: Literal["none", "data_parallel", "fsdp", "auto"] = Field(
        default="none", description="none = one device; data_parallel = weights replicated on every device, "
        "each batch split over them; fsdp = weights, gradients and optimizer state sharded over the mesh's model "
        "axis (gathered per layer when used), each batch split over every device; auto = none on one device, "
        "else data_parallel when the replicated model fits a device's memory, else fsdp (JAX only)")
    mesh: dict[Literal["batch", "model"], int] | None = Field(
        default=None, description="device mesh axis sizes, e.g. {batch: 2, model: 4}, whose product is the device "
        "count: fsdp shards weights over `model` (replicated over `batch`); data_parallel uses {batch: devices}; "
        "null = every device on one axis (data_parallel: batch; fsdp: model)")
    devices: int | None = Field(
        default=None, gt=0, description="use the first N devices (of all hosts); null = all of them")


class Recipe(Section):
    name: str = Field(min_length=1, description="the run's name (output_dir defaults to runs/<name>)")
    description: str | None = Field(default=None, description="free text about the recipe; null = none")
    backend: Literal["jax", "tensorflow", "torch"] | None = Field(
        default=None, description="Keras backend; null = KERAS_BACKEND from the environment, else jax; CLI "
        "--backend wins")
    seed: int = Field(default=0, description="seeds the data order, the eval_fraction carve, initialisation and "
                                             "dropout")
    output_dir: str | None = Field(default=None, description="the run directory (relative to the working "
                                                             "directory); null = runs/<name>")
    model: ModelSection = Field(description="the model to fine-tune: architecture, weights, tokenizer, dtype")
    method: str = Field(default="sft", description=f"tuning method: {' | '.join(METHODS)} (each declared in "
                                                   "gemma_tune.methods, with its data formats and options)")
    lora: LoraSection | None = Field(default=None, description="LoRA adapters to train; absent or null = full "
                                                               "fine-tuning")
    quantize: Literal["int8", "int4"] | None = Field(
        default=None, description="quantise the frozen base kernels (QLoRA; needs lora); null = not quantised")
    data: DataSection = Field(description="training and evaluation data, and how it becomes rows")
    train: TrainSection = Field(default_factory=TrainSection, description="optimisation, schedule, evaluation, "
                                                                          "checkpoints and logging")
    preference: PreferenceSection | None = Field(default=None, description="options of the preference methods "
                                                 "(dpo, ipo, simpo, orpo); only with one of them")
    reward: RewardSection | None = Field(default=None, description="options of the reward method (a reward model "
                                         "scoring sequences); only with method: reward")
    rl: RLSection | None = Field(default=None, description="options of the online RL methods (grpo, rloo): "
                                 "sampling, rewards, advantages and the clipped loss; only with one of them")
    distribution: DistributionSection = Field(default_factory=DistributionSection, description="data-parallel or "
                                              "sharded (FSDP) training over several devices or hosts (JAX)")
    export: ExportSection = Field(default_factory=ExportSection, description="what is exported after training")
