"""The memory plan: what a recipe needs per device, from arithmetic alone (no model built, no backend).

`estimate(recipe, mesh)` counts every variable of the model the recipe trains (`weights`), what the
optimiser keeps for the trained ones, and what one training step holds at its peak; `plan_for_run` and
`choose_mode` put it on the devices of a run. Bytes are per device; GiB = 2³⁰ bytes; device sizes are
decimal GB as vendors state them (`DEVICES`).

Notation: d = hidden_size, I = intermediate_size, q = heads · head_dim, kv = kv_heads · head_dim,
L = num_layers, V = vocab_size, r = lora.rank; c = bytes of the compute dtype (4 for float32, 2 for
bfloat16/float16), f = 4 (float32); R = rows of a micro-batch on one device (train.batch_size, twice that
for preference pairs, × rl.num_generations for grpo/rloo; divided by the mesh's data shards), T = tokens
per row (data.max_length, + rl.max_completion_length for grpo/rloo), n = R · T.

Parameters (elements, as `gemma_tune.models.count_params` counts them):

    embedding V·d (tied output head);  per block q/k/v/o d·q + 2·d·kv + q·d, gate/up/down 3·d·I, norms
    2·d (+ d for each post-norm, + 2·head_dim with QK-norm);  final norm d;  LoRA r·(in + out) per adapted
    projection;  the reward head d;  a vision tower: SigLIP (patch conv p²·3·W + W, positions P·W, per layer
    4·(W² + W) + 2·W·I_v + I_v + W + 4·W, post-norm 2·W) and the projector W·d (+ d bias for PaliGemma,
    + W soft-token norm for Gemma 3).

Storage (the dtype rules of gemma_tune/train/build.py): float32 → 4 bytes; bfloat16 with LoRA → the
frozen base in bfloat16 (2), adapters float32; bfloat16 or float16 full fine-tuning → mixed precision,
float32 variables; `quantize` int8 → 1 byte per kernel element + per-output-channel scales in the
variables' dtype, int4 → [in, ⌈out/2⌉] packed bytes + scales (the embedding is never quantised); the
reward head float32. Gradients: one per trained element, in its variable's dtype. Optimiser state
(Keras 3.15): AdamW two moments; Adafactor per ≥2-D variable row and column factors [..., rows] and
[..., cols] plus a full-size velocity (Keras allocates it for every variable), per 1-D variable the
velocity and two scalars; SGD none (momentum 0); with train.grad_accum > 1 one accumulator per trained
element (`gradient_accumulation_steps`), all in the variable's dtype.

A training step (JAX's autodiff in one XLA program) keeps from its forward pass what the backward reads
(the residuals below: JAX's, less what XLA's fusions recompute), and peaks either at the start of the
backward (every block's residuals, the loss chunk or the top block's backward, the head's gradient) or at its
end (all gradients) — in between, each block frees its residuals as its gradients appear:

    early = batch + activations + weight copies + gathered + max(loss chunk, block backward) + head gradient
    late  = batch + gradients + head gradient (full fine-tuning: the embedding lookup's cotangent, V·d·f)
    step  = weights + optimiser state + accumulators + reference + max(early, late)

Residuals of one decoder block without remat, bytes per token ("trained": the projection's kernel trains,
or it carries LoRA):

    MLP         4·I·c   gate and up outputs, gelu's tanh and its output (gelu's other terms are recomputed)
                + I·c   the down projection's input, if trained
                + I·c   per adapted gate/up: base and adapter products kept apart (their sum is fused away)
    norms       N·d·f   each norm's float32 input (N = 2 + post-norms); + N·d·f its x̂ when the scales train
    inputs      d·c for q/k/v, d·c for gate/up, q·c for o, if trained; + d·c per adapted o/down feeding a
                post-norm (base and adapter products)
    attention   (q + 2·kv)·c  rotated q, k and v;  8·head_dim  RoPE's cos and sin;  QK-norm 2·(q + kv)·f
                (its input and output), + (q + kv)·f x̂ when it trains
    LoRA        r·c per adapted projection (x·A)
    scores      per row and head T² · 12 on the dense path: the exponentials and the probabilities in float32,
                the latter twice (the layouts of the softmax's and of the value product's backward); + 8 for
                Gemma 2's soft-cap (plain path: tanh and its derivative); 0 on the flash path (cuDNN) and on
                the chunked path (rows of at least CHUNKED_FROM tokens where cuDNN does not apply: each tile of
                `tile_queries` queries is recomputed in the backward)
    weights     mixed precision: each kernel's cast to c (block kernels · c); bfloat16 LoRA: the factors'
                casts r·(in + out)·c

Around the blocks: the embedding output, the final norm's input and output (3·d·f per token); mixed
precision's cast of the embedding for the loss (V·d·c). Block backward: one cotangent per MLP residual, or
the scores' float32 cotangents (8 bytes per score), whichever is larger (chunked: one tile's recomputed
scores and their cotangents). Loss chunk (every method but reward;
C = min(train.loss_chunk_size, tokens), a chunk of positions over all rows for the sequence methods): the
float32 logits and their exponentials, C·V·2f, + C·V·c for the product before its cast when c ≠ f, + C·V·f
for online RL's entropy. A vision tower keeps activations only where it trains (model.train_vision:
projector — its input; all — every SigLIP layer as a block with dense attention over its P patches), one
image per row of image_text data. With remat (`train.remat`) a block keeps only its input (d·c per token)
and the backward recomputes one block at a time: the block backward then also holds that block's residuals
and weight casts.

Sharding (`MeshShape`, the contract gemma_tune.distribute follows): none — everything on one device;
data_parallel — weights, gradients and optimiser state replicated, each batch split over every device
(R ÷ data_shards); fsdp — every kernel, the embedding, LoRA factors (their large dimension), quantised
kernels (and o/down's scales), the vision kernels, the patch and position embeddings and the reward head
sharded over the `model` axis (÷ weight_shards where it divides the dimension, else replicated); norm scales
and biases replicated; gradients, moments and accumulators as their variable (Adafactor's factors
replicated); batches split over every device; and the gathered weights in c: without remat every block's
gathered kernels stay for the backward (GSPMD gathers each weight once per step), with remat two blocks' (the
one computed and the next), plus the gathered embedding for the loss.

Platform (`estimate(..., platform=)`): None or "tpu" — the dense attention path; "gpu" — the cuDNN flash path
where the trainer's attention "auto" takes it (`flash_attention_applies`); "cpu" — XLA:CPU, where remat saves
nothing (it schedules every block's recomputation before the backward) and a 16-bit step multiplies float32
copies of its kernels and embedding ((L · block kernels + V·d)·f).

Phases outside the step: DPO/IPO with a named `preference.reference` load it next to the model before
training (weights + reference + batch + loss chunk); GRPO/RLOO sample between steps (persistent state, the
KV cache 2·L·R_s·(P + N)·kv·c for R_s = batch_size · num_generations rows of P = data.max_length prompt and
N = max_completion_length new tokens, the prefill's largest layer and four [R_s, V] float32 arrays of the
sampling step); a full fine-tuning GRPO with rl.beta > 0 keeps a frozen copy of the starting weights
(`reference`). `total` is the largest phase. bench/memory_plan.py holds these figures against XLA's own
accounting of the compiled step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from gemma_tune.distribute.mesh import MeshError, MeshShape, mesh_shape
from gemma_tune.errors import ConfigError
from gemma_tune.models.tiling import CHUNK_ROWS, CHUNKED_FROM, tile_queries

GiB = 2 ** 30
GB = 10 ** 9
HEADROOM = 0.10  # of a device's memory left to the framework, the allocator's fragmentation and XLA's buffers
AUTO_FSDP_PARAMS = 2e9  # mode auto without a known device memory: fsdp above this many parameters
MAX_DEVICES = 1024  # the most fsdp devices a warning's suggestion goes to


@dataclass(frozen=True)
class Device:
    """An accelerator of the fits table: `memory_bytes` in decimal GB, as its vendor states it; `platform`
    gpu or tpu (JAX's name)."""

    name: str
    memory_bytes: int
    platform: str


DEVICES = tuple(sorted((
    Device("T4 16 GB", 16 * GB, "gpu"), Device("TPU v5e 16 GB", 16 * GB, "tpu"), Device("L4 24 GB", 24 * GB, "gpu"),
    Device("TPU v4 32 GB", 32 * GB, "tpu"), Device("TPU v6e 32 GB", 32 * GB, "tpu"),
    Device("A100 40 GB", 40 * GB, "gpu"), Device("A100 80 GB", 80 * GB, "gpu"), Device("H100 80 GB", 80 * GB, "gpu"),
    Device("TPU v5p 95 GB", 95 * GB, "tpu"), Device("H200 141 GB", 141 * GB, "gpu")),
    key=lambda d: d.memory_bytes))

PREFERENCE_METHODS = ("dpo", "ipo", "simpo", "orpo", "reward")
RL_METHODS = ("grpo", "rloo")
OUT_SHARDED = ("o", "down", "fc2")  # kernels [in, d] sharded on their output (layouts.py); the rest on their input


@dataclass(frozen=True)
class Weight:
    """`count` variables of logical `shape`: `dtype` float32 | bfloat16 | int8 | int4 (stored packed),
    `shard_dim` the dimension fsdp splits over the model axis (None: replicated), `param` False for
    quantisation scales (storage, not parameters)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    count: int = 1
    shard_dim: int | None = None
    param: bool = True

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.dtype == "int4":
            return (*self.shape[:-1], math.ceil(self.shape[-1] / 2))
        return self.shape

    def bytes_each(self, shards: int = 1) -> int:
        """Bytes of one such variable on one device when sharded `shards` ways (if its dimension divides)."""
        shape = self.stored_shape
        size = math.prod(shape) * DTYPE_BYTES[self.dtype]
        if shards > 1 and self.shard_dim is not None and shape[self.shard_dim] % shards == 0:
            return size // shards
        return size


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 1}


# ---- the model's variables ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Storage:
    """Variable dtypes and the compute dtype of a recipe (gemma_tune/train/build.py)."""

    base: str       # the model's own variables
    compute: int    # bytes of the compute dtype
    quantize: str | None

    @classmethod
    def of(cls, recipe) -> "Storage":
        dtype = recipe.model.dtype
        base = "bfloat16" if dtype == "bfloat16" and recipe.lora is not None else "float32"
        return cls(base=base, compute=4 if dtype == "float32" else 2, quantize=recipe.quantize)

    @property
    def mixed(self) -> bool:
        """float32 variables computed in a 16-bit dtype: each use casts the kernel."""
        return self.base == "float32" and self.compute == 2


def projection_shapes(arch) -> dict[str, tuple[int, int]]:
    """[in, out] of each projection of a decoder block, by LoRA target name."""
    d, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, i), "up": (d, i), "down": (i, d)}


def _shard_dim(name: str) -> int:
    return 1 if name in OUT_SHARDED else 0


def decoder_weights(arch, recipe, storage: Storage) -> list[Weight]:
    """The decoder's variables: embedding, blocks (kernels, scales of quantised kernels, LoRA, norms), final norm."""
    full = recipe.lora is None
    layers, d = arch.num_layers, arch.hidden_size
    targets = set(recipe.lora.targets) if recipe.lora else set()
    kernel_dtype = storage.quantize or storage.base
    out = [Weight("token_embedding", (arch.vocab_size, d), storage.base, full, shard_dim=0)]
    for name, (fan_in, fan_out) in projection_shapes(arch).items():
        out.append(Weight(f"{name}_proj.kernel", (fan_in, fan_out), kernel_dtype, full, layers, _shard_dim(name)))
        if storage.quantize:
            out.append(Weight(f"{name}_proj.kernel_scale", (fan_out,), storage.base, False, layers,
                              0 if name in OUT_SHARDED else None, param=False))
        if name in targets:
            rank = recipe.lora.rank
            out.append(Weight(f"{name}_proj.lora_kernel_a", (fan_in, rank), "float32", True, layers, 0))
            out.append(Weight(f"{name}_proj.lora_kernel_b", (rank, fan_out), "float32", True, layers, 1))
    norms = 2 + arch.use_post_attention_norm + arch.use_post_ffw_norm
    out.append(Weight("block norms", (d,), storage.base, full, layers * norms))
    if arch.use_qk_norm:
        out.append(Weight("q_norm/k_norm", (arch.head_dim,), storage.base, full, layers * 2))
    out.append(Weight("final_norm", (d,), storage.base, full))
    return out


def vision_weights(arch, recipe, storage: Storage) -> list[Weight]:
    """SigLIP, the projector and Gemma 3's soft-token norm (trained per model.train_vision)."""
    vision = arch.vision
    if vision is None:
        return []
    mode = recipe.model.train_vision
    encoder, head = mode == "all", mode != "none"
    w, iv, p, layers = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.num_layers
    dtype = storage.base
    out = [Weight("vision patch_embedding.kernel", (p, p, 3, w), dtype, encoder, shard_dim=3),
           Weight("vision biases and layer norms", (w,), dtype, encoder, 1 + layers * 9 + 2),
           Weight("vision position_embedding", (vision.patches_per_side ** 2, w), dtype, encoder, shard_dim=1),
           Weight("vision attention kernels", (w, w), dtype, encoder, layers * 3, 0),
           Weight("vision o_proj.kernel", (w, w), dtype, encoder, layers, 1),
           Weight("vision fc1.kernel", (w, iv), dtype, encoder, layers, 0),
           Weight("vision fc1.bias", (iv,), dtype, encoder, layers),
           Weight("vision fc2.kernel", (iv, w), dtype, encoder, layers, 1),
           Weight("vision projector.kernel", (w, arch.hidden_size), dtype, head, shard_dim=0)]
    if arch.family == "gemma3":
        out.append(Weight("vision soft_embedding_norm", (w,), dtype, head))
    else:
        out.append(Weight("vision projector.bias", (arch.hidden_size,), dtype, head))
    return out


def model_weights(arch, recipe) -> list[Weight]:
    """Every variable the recipe's run trains or holds: decoder, vision tower, the reward method's head."""
    storage = Storage.of(recipe)
    out = decoder_weights(arch, recipe, storage) + vision_weights(arch, recipe, storage)
    if recipe.method == "reward":
        out.append(Weight("score.kernel", (arch.hidden_size, 1), "float32", True, shard_dim=0))
    return out


def parameter_count(weights: list[Weight], trainable: bool | None = None) -> int:
    """Elements of the weights (quantisation scales excluded); `trainable` True/False narrows to those."""
    return sum(w.elements * w.count for w in weights
               if w.param and (trainable is None or w.trainable == trainable))


def device_bytes(weights: list[Weight], mesh: MeshShape) -> int:
    return sum(w.bytes_each(mesh.weight_shards) * w.count for w in weights)


def optimizer_bytes(weights: list[Weight], optimizer: str, mesh: MeshShape) -> int:
    """Optimiser state of the trained `weights` per device (module docstring)."""
    total = 0
    for w in weights:
        if not w.trainable:
            continue
        itemsize, full = DTYPE_BYTES[w.dtype], w.bytes_each(mesh.weight_shards)
        if optimizer == "adamw":
            total += 2 * full * w.count
        elif optimizer == "adafactor":
            factors = (math.prod(w.shape[:-1]) + math.prod(w.shape[:-2]) * w.shape[-1]) if len(w.shape) >= 2 else 2
            total += (full + factors * itemsize) * w.count
    return total


# ---- activations -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What one micro-batch of the recipe puts through the decoder on one device."""

    rows: int           # R: rows on one device
    length: int         # T: tokens per row
    chunk_tokens: int   # tokens whose logits the chunked loss holds at once (0: no logits)
    batch_bytes: int    # the batch arrays themselves
    images: int         # images on one device (vision models)

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def with_images(recipe, arch) -> bool:
    """Whether the recipe's batches carry images: a vision model on image_text data (one image per row is
    planned; a chat split with image parts is planned as text)."""
    return arch.vision is not None and recipe.data.train.format == "image_text"


def step_shape(recipe, arch, mesh: MeshShape) -> StepShape:
    """Rows and length of a micro-batch per method, split over the mesh's data shards (module docstring)."""
    from gemma_tune.methods import method_options

    per_device = math.ceil(recipe.train.batch_size / mesh.data_shards)
    length = recipe.data.max_length
    arrays = 5  # token_ids, segment_ids, positions, target_ids, loss_mask: 4 bytes per token each
    if recipe.method in PREFERENCE_METHODS:
        rows = 2 * per_device
    elif recipe.method in RL_METHODS:
        options = method_options(recipe)
        rows = per_device * options["num_generations"]
        length += options["max_completion_length"]
        arrays += (options["num_iterations"] > 1) + (options["beta"] > 0)  # old and reference log-probs
    else:
        rows = per_device
    if recipe.method == "reward":
        chunk = 0
    elif recipe.method == "sft":
        chunk = min(recipe.train.loss_chunk_size, rows * length)
    else:  # sequence_logps / token_logps: chunks of positions over every row
        chunk = rows * min(max(1, recipe.train.loss_chunk_size // rows), length)
    images = rows if with_images(recipe, arch) else 0
    image_bytes = images * arch.vision.image_size ** 2 * 3 * 4 if images else 0
    return StepShape(rows, length, chunk, rows * length * arrays * 4 + image_bytes, images)


def attention_in_chunks(queries: int, flash: bool) -> bool:
    """Whether attention "auto" runs `queries` in tiles (`gemma_tune.models.attention`)."""
    return not flash and queries >= CHUNKED_FROM


def attention_bytes_per_score(softcapped: bool, flash: bool = False) -> int:
    """Bytes the dense attention keeps per (row, head, query, key): the masked logits' exponentials and the
    probabilities in float32, the latter twice (in the layouts of the softmax's and of the value product's
    backward; a 16-bit compute dtype is converted inside the consuming fusion); Gemma 2's soft-cap (plain
    path) adds tanh and its derivative. The flash path keeps none."""
    if flash:
        return 0
    return 12 + (8 if softcapped else 0)


@dataclass(frozen=True)
class BlockShape:
    """One decoder block's residual accounting inputs: who trains, the dtypes, the micro-batch."""

    arch: object
    c: int
    full: bool
    targets: frozenset
    rank: int
    tokens: int
    rows: int
    length: int
    flash: bool

    @classmethod
    def of(cls, arch, recipe, storage: Storage, shape: StepShape, flash: bool) -> "BlockShape":
        targets = frozenset(recipe.lora.targets) if recipe.lora else frozenset()
        return cls(arch, storage.compute, recipe.lora is None, targets, recipe.lora.rank if recipe.lora else 0,
                   shape.tokens, shape.rows, shape.length, flash)

    @property
    def chunked(self) -> bool:
        """Whether attention "auto" takes the chunked path (`attention_in_chunks`)."""
        return attention_in_chunks(self.length, self.flash)

    def trained(self, *names: str) -> bool:
        """Whether one of these projections trains (its kernel, or LoRA on it): its input is then kept."""
        return self.full or bool(self.targets & set(names))

    def adapted(self, name: str) -> bool:
        return name in self.targets


def mlp_residuals(b: BlockShape) -> int:
    """Bytes the GeGLU MLP keeps: the gate and up outputs, gelu's tanh and output, the down projection's input
    when it trains; an adapted gate or up keeps its base and adapter products apart (XLA fuses their sum into
    each consumer). gelu's other intermediates are recomputed in the backward's fusions."""
    i, c = b.arch.intermediate_size, b.c
    arrays = 4 + b.trained("down") + b.adapted("gate") + b.adapted("up")
    return b.tokens * arrays * i * c


def attention_residuals(b: BlockShape) -> int:
    """Bytes the rest of a block keeps: norms, projection inputs, q/k/v, RoPE, LoRA, the [T, T] scores."""
    arch, c, f = b.arch, b.c, 4
    d, q = arch.hidden_size, arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    norms = 2 + arch.use_post_attention_norm + arch.use_post_ffw_norm
    per_token = norms * d * f * (2 if b.full else 1)  # each norm's float32 input (+ its x̂ when scales train)
    per_token += d * c * (b.trained("q", "k", "v") + b.trained("gate", "up")) + q * c * b.trained("o")
    per_token += d * c * ((b.adapted("o") and arch.use_post_attention_norm)
                          + (b.adapted("down") and arch.use_post_ffw_norm))  # base and adapter products
    per_token += (q + 2 * kv) * c + 8 * arch.head_dim  # rotated q, k and v; RoPE's cos and sin
    if arch.use_qk_norm:
        per_token += (q + kv) * f * (3 if b.full else 2)
    per_token += b.rank * c * len(b.targets)  # x·A of each adapter
    per_score = attention_bytes_per_score(arch.attn_logit_softcap is not None, b.flash or b.chunked)
    scores = b.rows * arch.num_heads * b.length ** 2 * per_score
    return b.tokens * per_token + scores


def block_residuals(b: BlockShape) -> int:
    """Bytes one decoder block keeps for the backward without remat (module docstring's table)."""
    return mlp_residuals(b) + attention_residuals(b)


def block_backward_bytes(b: BlockShape, platform: str | None = None) -> int:
    """The top block's backward beyond its residuals: one cotangent per MLP residual, or the scores'
    cotangents (probabilities and logits, float32) on the dense path, whichever is larger. On the chunked path
    the scores are recomputed tile by tile: one tile's scores and their cotangents at a time, or on XLA:CPU,
    which schedules every tile's recomputation of a layer before its backward, all the tiles' scores of a
    global layer (12 bytes each, 40 soft-capped: measured by bench/memory_plan.py at 8192 tokens)."""
    scores = 0 if b.flash else b.rows * b.arch.num_heads * b.length ** 2 * 8
    if b.chunked:
        per_score = attention_bytes_per_score(b.arch.attn_logit_softcap is not None)
        heads, tile = b.arch.num_heads, tile_queries(b.rows, b.arch.num_heads, b.length)
        if platform == "cpu":
            cpu_per_score = 40 if b.arch.attn_logit_softcap is not None else 12
            scores = b.rows * heads * causal_tile_scores(b.length, tile) * cpu_per_score
        else:
            scores = b.rows * heads * min(tile, b.length) * b.length * (per_score + 8)
    return max(mlp_residuals(b), scores)


def causal_tile_scores(length: int, tile: int) -> int:
    """(query, key) pairs the tiles of a global causal layer hold: queries [s, s + tile) over keys [0, s + tile)."""
    return sum((min(start + tile, length) - start) * min(start + tile, length) for start in range(0, length, tile))


def block_weight_casts(arch, recipe, storage: Storage) -> int:
    """Bytes of the compute-dtype copies of one block's weights that its backward reads."""
    shapes = projection_shapes(arch)
    if storage.mixed:
        return sum(a * b for a, b in shapes.values()) * storage.compute
    if recipe.lora is not None and storage.compute == 2:
        return sum(recipe.lora.rank * sum(shapes[t]) for t in recipe.lora.targets) * storage.compute
    return 0


def vision_residuals(arch, recipe, storage: Storage, images: int) -> int:
    """Bytes the vision tower keeps for the backward: nothing when it is frozen; the projector's input (and
    Gemma 3's soft-token norm input and x̂) over the soft tokens; with the encoder trained, each SigLIP layer as
    a block — LayerNorm inputs and x̂ (4·W·f), the q/k/v, attention-output and fc1 inputs and q, k, v (6·W·c),
    fc1's output, gelu's tanh and output (3·I_v·c) per patch, dense scores over the P patches."""
    vision, mode = arch.vision, recipe.model.train_vision
    if vision is None or mode == "none" or images == 0:
        return 0
    c, f, w, iv = storage.compute, 4, vision.hidden_size, vision.intermediate_size
    soft_tokens = images * vision.tokens_per_image
    kept = soft_tokens * w * (c + (2 * f if arch.family == "gemma3" else 0))
    if mode == "all":
        patches = images * vision.patches_per_side ** 2
        scores = images * vision.num_heads * (vision.patches_per_side ** 2) ** 2 * attention_bytes_per_score(False)
        kept += vision.num_layers * (patches * (4 * w * f + 6 * w * c + 3 * iv * c) + scores)
    return kept


def loss_chunk_bytes(recipe, arch, storage: Storage, chunk_tokens: int) -> int:
    """Bytes of the chunked loss's one chunk: its float32 logits and their exponentials (the product in c
    before its cast when c ≠ f; online RL's entropy adds one more)."""
    if chunk_tokens == 0:
        return 0
    per = 2 * 4 + (storage.compute if storage.compute != 4 else 0) + (4 if recipe.method in RL_METHODS else 0)
    return chunk_tokens * arch.vocab_size * per


# ---- the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """A recipe's memory per device (module docstring): parameter counts, each component's bytes, and the
    totals with and without remat."""

    name: str
    description: str
    mesh: MeshShape
    remat: bool
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    accumulators: int
    reference: int
    batch: int
    activations: dict[bool, int]
    block_backward: dict[bool, int]
    weight_copies: dict[bool, int]
    gathered: dict[bool, int]
    loss_chunk: int
    head_gradients: int
    sampler: int = 0
    setup: int = 0
    notes: tuple[str, ...] = ()
    recipe: object = field(default=None, compare=False, repr=False)
    architecture: object = field(default=None, compare=False, repr=False)
    platform: str | None = None

    def persistent(self) -> int:
        """Held across steps: weights, optimiser state, accumulators, a frozen reference copy."""
        return self.weights + self.optimizer + self.accumulators + self.reference

    def step(self, remat: bool | None = None) -> int:
        """The training step's peak per device: persistent + batch + max(early, late) (module docstring)."""
        remat = self.remat if remat is None else remat
        early = (self.activations[remat] + self.weight_copies[remat] + self.gathered[remat] + self.head_gradients
                 + max(self.loss_chunk, self.block_backward[remat]))
        late = self.gradients + self.head_gradients  # the embedding's lookup cotangent, V·d·f, before the sum
        return self.persistent() + self.batch + max(early, late)

    def total(self, remat: bool | None = None) -> int:
        """Peak bytes per device: the largest of the training step, the sampling phase and the setup."""
        return max(self.step(remat), self.sampler, self.setup)

    def fits(self, device_bytes: int, remat: bool | None = None) -> bool:
        """Whether the plan fits a device of `device_bytes`, HEADROOM left free."""
        return self.total(remat) <= device_bytes * (1 - HEADROOM)

    def fitting_devices(self, remat: bool | None = None) -> list[Device]:
        return [device for device in DEVICES if self.fits(device.memory_bytes, remat)]

    def fits_text(self, remat: bool | None = None) -> str:
        fitting = self.fitting_devices(remat)
        if not fitting:
            return f"fits none of the listed devices (largest {DEVICES[-1].name})"
        smallest = [d.name for d in fitting if d.memory_bytes == fitting[0].memory_bytes]
        if len(fitting) == len(smallest):
            return f"fits {' and '.join(smallest)} only"
        return f"fits {', '.join(smallest)} and larger"

    def summary_line(self) -> str:
        """One line: parameters, trainable, the per-device total, the mesh, the devices it fits."""
        return (f"plan: {count_text(self.params)} params ({count_text(self.trainable)} trainable), "
                f"{gib(self.total())} per device, {self.mesh_text()}, remat {'on' if self.remat else 'off'} — "
                f"{self.fits_text()}")

    def mesh_text(self) -> str:
        return self.mesh.describe()

    def warning(self, device_bytes: int) -> str | None:
        """None when the plan fits `device_bytes`; else what is over and which changes would fit
        (`alternatives`)."""
        if self.fits(device_bytes):
            return None
        usable = device_bytes * (1 - HEADROOM)
        ways = [f"{change} ({gib(plan.total())})" for change, plan in self.alternatives(device_bytes).items()
                if plan.fits(device_bytes)]
        advice = "; would fit: " + "; ".join(ways) if ways else "; no change tried fits: a larger device is needed"
        return (f"warning: {gib(self.total())} per device does not fit {device_bytes / GB:,.0f} GB less "
                f"{HEADROOM:.0%} headroom ({gib(usable)}){advice}")

    def alternatives(self, device_bytes: int) -> dict[str, "MemoryPlan"]:
        """Changes that lower the plan, each planned: remat on, LoRA, the largest batch (grad_accum making up
        the rest) that fits `device_bytes`, and fsdp over the fewest devices (up to MAX_DEVICES) that fits —
        as the recipe is, and with remat and LoRA too."""
        recipe, mesh = self.recipe, self.mesh
        out, combined, changes = {}, recipe, []
        if not recipe.train.remat:
            combined = _with(combined, "train", remat=True)
            changes.append("remat")
            out["train.remat=true"] = self._planned(combined, mesh)
        if recipe.lora is None:
            from gemma_tune.config.schema import LoraSection

            lora = {"lora": LoraSection()}
            out["lora (rank 16)"] = self._planned(recipe.model_copy(update=lora), mesh)
            combined = combined.model_copy(update=lora)
            changes.append("LoRA")
        smaller = self._largest_batch(recipe, device_bytes)
        if smaller is not None:
            out[f"train.batch_size={smaller.train.batch_size} train.grad_accum={smaller.train.grad_accum}"] = (
                self._planned(smaller, mesh))
        tries = [(recipe, "")] + ([(combined, " with " + " and ".join(changes))] if changes else [])
        for changed, label in tries:
            devices = self._fewest_fsdp_devices(changed, device_bytes)
            if devices is not None:
                out[f"distribution.mode=fsdp on {devices} devices{label}"] = self._planned(
                    changed, MeshShape("fsdp", model=devices))
        return out

    def _planned(self, recipe, mesh: MeshShape) -> "MemoryPlan":
        return estimate(recipe, mesh, self.architecture, platform=self.platform)

    def _largest_batch(self, recipe, device_bytes: int):
        batch, accum = recipe.train.batch_size, recipe.train.grad_accum
        while batch > 1:
            batch = max(1, batch // 2)
            changed = _with(recipe, "train", batch_size=batch,
                            grad_accum=accum * math.ceil(recipe.train.batch_size / batch))
            if self._planned(changed, self.mesh).fits(device_bytes):
                return changed
        return None

    def _fewest_fsdp_devices(self, recipe, device_bytes: int) -> int | None:
        devices = max(2, self.mesh.devices)
        while devices <= MAX_DEVICES:
            if self._planned(recipe, MeshShape("fsdp", model=devices)).fits(device_bytes):
                return devices
            devices *= 2
        return None

    def rows(self) -> list[tuple[str, int, int]]:
        """(component, bytes without remat, bytes with remat) in the report's order."""
        same = lambda value: (value, value)  # noqa: E731
        table = [("weights", *same(self.weights)), ("gradients", *same(self.gradients)),
                 ("optimizer state", *same(self.optimizer)),
                 ("gradient accumulators", *same(self.accumulators)),
                 ("reference model", *same(self.reference)), ("batch", *same(self.batch)),
                 ("activations kept for the backward", self.activations[False], self.activations[True]),
                 ("block backward", self.block_backward[False], self.block_backward[True]),
                 ("compute-dtype weight copies", self.weight_copies[False], self.weight_copies[True]),
                 ("fsdp: gathered weights", self.gathered[False], self.gathered[True]),
                 ("loss chunk", *same(self.loss_chunk)),
                 ("training step peak", self.step(False), self.step(True))]
        if self.sampler:
            table.append(("sampling phase (grpo/rloo)", *same(self.sampler)))
        if self.setup:
            table.append(("reference pass before training", *same(self.setup)))
        table.append(("total", self.total(False), self.total(True)))
        return table

    def report(self, device: Device | None = None) -> str:
        """The full table `gemma-tune plan` prints; the warning for `device` (default: when it fits no device)."""
        lines = [f"plan: {self.name} — {self.description}",
                 f"  parameters   {self.params:,} ({count_text(self.params)}), trainable {self.trainable:,} "
                 f"({100 * self.trainable / max(self.params, 1):.2f}%)",
                 f"  mesh         {self.mesh_text()}", "",
                 f"  {'per device':<36}{'remat off':>12}{'remat on':>12}"]
        unit = GiB if self.total(False) >= GiB else 2 ** 20
        for name, off, on in self.rows():
            if off or on or name in ("weights", "total"):
                lines.append(f"  {name:<36}{gib(off, unit):>12}{gib(on, unit):>12}")
        heading = f"fits ({HEADROOM:.0%} left free; decimal GB as vendors state them)"
        lines += ["", f"  {heading:<58}{'remat off':>10}{'remat on':>10}"]
        for each in DEVICES:
            mark = " <" if device is not None and each.name == device.name else ""
            lines.append(f"    {each.name:<56}{yes(self.fits(each.memory_bytes, False)):>10}"
                         f"{yes(self.fits(each.memory_bytes, True)):>10}{mark}")
        lines += [f"  (the recipe's remat is {'on' if self.remat else 'off'}: train.remat)"]
        lines += [f"  note: {note}" for note in self.notes]
        warning = self.warning((device or DEVICES[-1]).memory_bytes)
        if warning and (device is not None or not self.fitting_devices()):
            lines += ["", warning + (f" ({device.name})" if device else f" (even {DEVICES[-1].name})")]
        return "\n".join(lines)


def gib(value: int, unit: int | None = None) -> str:
    """`value` bytes in GiB, or in MiB below 1 GiB (or in the `unit` given, 2³⁰ or 2²⁰)."""
    unit = unit or (GiB if value >= GiB else 2 ** 20)
    return f"{value / unit:,.2f} {'GiB' if unit == GiB else 'MiB'}"


def count_text(value: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}" if suffix == "B" else f"{value / scale:.1f}{suffix}"
    return str(value)


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


# ---- estimating ----------------------------------------------------------------------------------------
def architecture_for(recipe):
    """The recipe's architecture without downloading anything; a ConfigError when only the hub knows it."""
    from gemma_tune.config.validate import known_architecture

    arch = known_architecture(recipe)
    if arch is None:
        raise ConfigError(f"the architecture of {recipe.model.weights} is known only once it is downloaded: "
                          "name its model.preset (gemma-tune list shows them) to plan its memory",
                          where="model.preset")
    return arch


def estimate(recipe, mesh: MeshShape, architecture=None, *, platform: str | None = None) -> MemoryPlan:
    """The memory plan of a validated `recipe` on `mesh` (module docstring). `platform`: where the step runs —
    "gpu" (the cuDNN flash attention path where the trainer takes it, `flash_attention_applies`), "tpu", "cpu"
    (XLA:CPU: remat saves nothing, 16-bit matmuls run on float32 copies of their weights), or None (an
    accelerator, dense attention)."""
    arch = architecture or architecture_for(recipe)
    storage = Storage.of(recipe)
    weights = model_weights(arch, recipe)
    trained = [w for w in weights if w.trainable]
    shape = step_shape(recipe, arch, mesh)
    flash = platform is not None and flash_attention_applies(recipe, platform, arch)
    embedding = arch.vocab_size * arch.hidden_size
    plan = MemoryPlan(
        name=recipe.name, description=describe(recipe, arch, shape), mesh=mesh, remat=recipe.train.remat,
        params=parameter_count(weights), trainable=parameter_count(weights, trainable=True),
        weights=device_bytes(weights, mesh), gradients=device_bytes(trained, mesh),
        optimizer=optimizer_bytes(weights, recipe.train.optimizer, mesh),
        accumulators=device_bytes(trained, mesh) if recipe.train.grad_accum > 1 else 0,
        reference=reference_bytes(recipe, weights, mesh), batch=shape.batch_bytes,
        **step_parts(arch, recipe, storage, shape, mesh, BlockShape.of(arch, recipe, storage, shape, flash), platform),
        loss_chunk=loss_chunk_bytes(recipe, arch, storage, shape.chunk_tokens),
        head_gradients=embedding * 4 // embedding_shards(arch, mesh) if recipe.lora is None else 0,
        notes=plan_notes(recipe, arch, flash, attention_in_chunks(shape.length, flash), platform), recipe=recipe,
        architecture=arch, platform=platform)
    return replace(plan, sampler=sampler_bytes(recipe, arch, storage, mesh, plan),
                   setup=setup_bytes(recipe, weights, mesh, plan))


def embedding_shards(arch, mesh: MeshShape) -> int:
    """How many ways fsdp splits the embedding (its vocabulary axis, where the model axis divides it)."""
    return mesh.weight_shards if arch.vocab_size % mesh.weight_shards == 0 else 1


def step_parts(arch, recipe, storage: Storage, shape: StepShape, mesh: MeshShape, block: BlockShape,
               platform: str | None) -> dict[str, dict[bool, int]]:
    """The step's parts that remat changes, {remat: bytes} each: activations, block backward, weight copies,
    fsdp's gathered weights (module docstring)."""
    residuals, d, c = block_residuals(block), arch.hidden_size, storage.compute
    around = shape.tokens * 3 * d * 4 + vision_residuals(arch, recipe, storage, shape.images)
    casts = block_weight_casts(arch, recipe, storage) // mesh.weight_shards
    fixed_copies = (arch.vocab_size * d * c // embedding_shards(arch, mesh) if storage.mixed else 0) + (
        cpu_float32_copies(arch, storage, mesh) if platform == "cpu" else 0)
    parts = {"activations": {False: arch.num_layers * residuals + around,
                             True: shape.tokens * d * c * arch.num_layers + around},
             "block_backward": {False: block_backward_bytes(block, platform),
                                True: residuals + block_backward_bytes(block, platform)},
             "weight_copies": {False: arch.num_layers * casts + fixed_copies, True: casts + fixed_copies},
             "gathered": gathered_bytes(arch, storage, mesh)}
    if platform == "cpu":  # XLA:CPU schedules every block's recomputation before the backward
        for part in parts.values():
            part[True] = part[False]
    return parts


def cpu_float32_copies(arch, storage: Storage, mesh: MeshShape) -> int:
    """XLA:CPU multiplies 16-bit matrices in float32: every kernel and the embedding a 16-bit step multiplies by
    is converted to a float32 copy (kept for the backward's products too)."""
    if storage.compute == 4:
        return 0
    kernels = arch.num_layers * sum(a * b for a, b in projection_shapes(arch).values())
    return (kernels + arch.vocab_size * arch.hidden_size) * 4 // mesh.weight_shards


def describe(recipe, arch, shape: StepShape) -> str:
    how = f"LoRA rank {recipe.lora.rank}" if recipe.lora else "full fine-tuning"
    if recipe.quantize:
        how += f" on an {recipe.quantize} base"
    return (f"{recipe.model.preset or arch.family} ({arch.num_layers} layers, hidden {arch.hidden_size}), "
            f"{recipe.method}, {how}, {recipe.model.dtype}, {recipe.train.optimizer}; micro-batch per device "
            f"{shape.rows} rows × {shape.length} tokens")


def plan_notes(recipe, arch, flash: bool, chunked: bool, platform: str | None) -> tuple[str, ...]:
    notes = []
    if chunked:
        notes.append(f"attention in tiles of up to {CHUNK_ROWS} queries (rows of {CHUNKED_FROM} tokens or more): no [T, T] "
                     "scores kept, one tile's recomputed in the backward")
    elif not flash:
        notes.append("attention on the dense path ([T, T] probabilities kept per layer), as on CPUs and TPUs and "
                     "for float32, vision or soft-capped models; a GPU with bfloat16 takes the cuDNN flash path, "
                     "which keeps none (--platform gpu, or a GPU --device)")
    if platform == "cpu":
        notes.append("XLA:CPU: remat saves nothing (every block's recomputation is scheduled before the backward), "
                     "and 16-bit matmuls run on float32 copies of their weights")
    if with_images(recipe, arch):
        notes.append("one image per row")
    elif arch.vision is not None:
        notes.append("planned as text: the vision tower runs only for batches with images (image_text data)")
    if recipe.method in RL_METHODS:
        notes.append("grpo/rloo: rows = batch_size × num_generations of max_length + max_completion_length tokens")
    return tuple(notes)


def reference_bytes(recipe, weights: list[Weight], mesh: MeshShape) -> int:
    """A frozen copy of the starting weights kept through training: grpo/rloo full fine-tuning with β > 0."""
    from gemma_tune.methods import method_options

    if recipe.method in RL_METHODS and recipe.lora is None and method_options(recipe)["beta"] > 0:
        return device_bytes([w for w in weights if w.name != "score.kernel"], mesh)
    return 0


def gathered_bytes(arch, storage: Storage, mesh: MeshShape) -> dict[bool, int]:
    """fsdp: the weights in flight, gathered in c. Without remat every block's gathered kernels stay for the
    backward's products (GSPMD gathers each weight once per step); with remat only the block being computed
    and the next one. The loss keeps the gathered embedding."""
    if mesh.weight_shards == 1:
        return {False: 0, True: 0}
    block = sum(a * b for a, b in projection_shapes(arch).values()) * storage.compute
    embedding = arch.vocab_size * arch.hidden_size * storage.compute
    return {False: arch.num_layers * block + embedding, True: 2 * block + embedding}


def setup_bytes(recipe, weights: list[Weight], mesh: MeshShape, plan: MemoryPlan) -> int:
    """dpo/ipo with a named reference: it is loaded beside the model (float32 variables under mixed precision,
    as `load_model` with the recipe's policy) and scored before training."""
    from gemma_tune.methods import method_options

    if recipe.method not in ("dpo", "ipo") or method_options(recipe)["reference"] is None:
        return 0
    decoder = [replace(w, dtype="float32" if recipe.model.dtype != "float32" else w.dtype)
               for w in weights if not w.name.startswith(("score", "vision")) and "lora" not in w.name]
    return plan.weights + device_bytes(decoder, mesh) + plan.batch + plan.loss_chunk


def sampler_bytes(recipe, arch, storage: Storage, mesh: MeshShape, plan: MemoryPlan) -> int:
    """grpo/rloo's sampling phase: persistent state, the KV cache, the prefill's largest layer, the logits."""
    from gemma_tune.methods import method_options

    if recipe.method not in RL_METHODS:
        return 0
    options = method_options(recipe)
    rows = math.ceil(recipe.train.batch_size / mesh.data_shards) * options["num_generations"]
    prompt, new = recipe.data.max_length, options["max_completion_length"]
    c, kv = storage.compute, arch.num_kv_heads * arch.head_dim
    cache = 2 * arch.num_layers * rows * (prompt + new) * kv * c
    prefill = rows * prompt * (3 * arch.intermediate_size * c + 4 * arch.hidden_size * 4)
    per_score = attention_bytes_per_score(arch.attn_logit_softcap is not None)
    if attention_in_chunks(prompt, flash=False):  # one tile of the prefill at a time
        queries = min(tile_queries(rows, arch.num_heads, prompt + new), prompt)
    else:
        queries = prompt
    prefill += rows * arch.num_heads * queries * (prompt + new) * per_score
    logits = 4 * rows * arch.vocab_size * 4  # logits, probabilities, sorted values and indices (top-p)
    return plan.persistent() + cache + prefill + logits


def _with(recipe, section: str, **values):
    part = getattr(recipe, section).model_copy(update=values)
    return recipe.model_copy(update={section: part})


# ---- the devices of a run ----------------------------------------------------------------------------
def choose_mode(recipe, device_count: int, device_memory_bytes: int | None) -> MeshShape:
    """distribution.mode auto: none on one device; else data_parallel when the replicated plan fits a device
    (HEADROOM left), else fsdp over every device (the recipe's mesh when it has one). With the device memory
    unknown (CPUs): data_parallel up to AUTO_FSDP_PARAMS parameters, fsdp above."""
    if device_count == 1:
        return MeshShape("none")
    replicated = _mesh(recipe, "data_parallel", None, device_count)
    if device_memory_bytes is None:
        big = parameter_count(model_weights(architecture_for(recipe), recipe)) > AUTO_FSDP_PARAMS
    else:
        big = not estimate(recipe, replicated).fits(device_memory_bytes)
    return _mesh(recipe, "fsdp", recipe.distribution.mesh, device_count) if big else replicated


def plan_for_run(recipe, device_count: int, device_memory_bytes: int | None, *,
                 platform: str | None = None) -> MemoryPlan:
    """The plan of `recipe` on the `device_count` devices a run uses (the recipe's distribution.mode and mesh;
    auto per `choose_mode`), on `platform` (`estimate`)."""
    section = recipe.distribution
    if section.mode == "auto":
        mesh = choose_mode(recipe, device_count, device_memory_bytes)
    else:
        mesh = _mesh(recipe, section.mode, section.mesh, device_count)
    return estimate(recipe, mesh, platform=platform)


def flash_attention_applies(recipe, platform: str | None, architecture=None) -> bool:
    """Whether the trainer's attention "auto" takes the cuDNN flash path: JAX on a GPU, 16-bit compute, a text
    batch without images (their bidirectional blocks take the fused path), no soft-cap (Gemma 2 takes the
    plain path)."""
    arch = architecture or architecture_for(recipe)
    return (platform == "gpu" and recipe.model.dtype != "float32" and not with_images(recipe, arch)
            and arch.attn_logit_softcap is None and recipe.backend in (None, "jax"))


def _mesh(recipe, mode: str, mesh: dict | None, device_count: int) -> MeshShape:
    try:
        return mesh_shape(mode, mesh, device_count)
    except MeshError as e:
        raise ConfigError(str(e), where=e.key) from None


def find_device(name: str) -> Device:
    """The `DEVICES` entry a name such as "H100", "a100-40gb" or "tpu v5e" means; a ConfigError otherwise."""
    words = set(_words(name))
    matches = [d for d in DEVICES if _words(d.name) == _words(name)] or [
        d for d in DEVICES if words and words <= set(_words(d.name))]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(d.name for d in DEVICES)
    problem = "matches several devices" if matches else "is not a listed device"
    raise ConfigError(f"--device {name!r} {problem}; expected one of: {known}")


def _words(name: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+\d*[a-z]*|\d+", name.lower()) if w != "gb"]
