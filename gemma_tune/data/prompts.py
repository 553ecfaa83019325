"""Prompts for online RL (`format: prompt`, methods grpo/rloo): token ids to complete, and each prompt's row.

A `PromptSplit` holds, per prompt kept, its token ids (the chat-templated prompt ending with the opened model
turn, render.generation_prompt_pieces), the prompt as the data holds it (a string or messages: what reward
functions receive) and the row's other columns (e.g. `answer`), also for the reward functions. A prompt longer
than `data.max_length` tokens (TRL's max_prompt_length) is left out and counted (`prompt_too_long`): a cut
problem statement would be rewarded for answers to a question it no longer asks.

Rounds: round r (0-based, counted over the run) is the r-th run of `n` prompts in the endless sequence of epoch
permutations, each drawn from NumPy's PCG64 seeded by (seed, epoch), so round r is the same prompts on every
run and backend and a resumed run continues with the prompts it would have had (a round may span two epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class PromptBatch:
    """Prompts of one round or eval chunk: their `rows` (indices in the split), `ids` (token ids each),
    `prompts` (as the data holds them) and `columns` ({name: one value per prompt})."""

    rows: list[int]
    ids: list[list[int]]
    prompts: list
    columns: dict[str, list]


class PromptSplit:
    """Prompts kept for online RL and their rows' other columns (module docstring)."""

    def __init__(self, ids: list[list[int]], prompts: list, columns: dict[str, list]):
        self.ids, self.prompts, self.columns = ids, prompts, columns

    def __len__(self) -> int:
        return len(self.ids)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Rounds of `batch_size` prompts per pass over the prompts."""
        return math.ceil(len(self) / batch_size)

    def take(self, rows) -> PromptBatch:
        rows = [int(r) for r in rows]
        return PromptBatch(rows, [self.ids[r] for r in rows], [self.prompts[r] for r in rows],
                           {name: [values[r] for r in rows] for name, values in self.columns.items()})

    def round_rows(self, n: int, seed: int, round_index: int) -> np.ndarray:
        """The rows of round `round_index` of `n` prompts (module docstring)."""
        size = len(self)
        first = round_index * n
        epoch, offset = divmod(first, size)
        rows = []
        while len(rows) < n:
            order = np.random.default_rng([seed, epoch]).permutation(size)
            rows.extend(order[offset:offset + n - len(rows)].tolist())
            epoch, offset = epoch + 1, 0
        return np.asarray(rows)

    def one_pass(self, n: int) -> Iterator[PromptBatch]:
        """Every prompt once, in stored order, `n` at a time (the last chunk may be shorter)."""
        for start in range(0, len(self), n):
            yield self.take(range(start, min(start + n, len(self))))


def build_prompt_split(ds, rows, data, stats: dict, where: str) -> PromptSplit:
    """The PromptSplit of tokenised prompt rows `ds` (columns input_ids, source_row) whose source rows are
    `rows` (the loaded data); fills `stats` (prompt_too_long counted, and a DataError when none is left)."""
    from gemma_tune.errors import DataError

    ids, prompts, sources, too_long = [], [], [], 0
    prompt_column = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
    for input_ids, source_row in zip(ds["input_ids"], ds["source_row"]):
        if len(input_ids) > data.max_length:
            too_long += 1
            continue
        ids.append(list(input_ids))
        sources.append(int(source_row))
    if not ids:
        raise DataError(f"all {len(ds)} prompts are longer than data.max_length={data.max_length} tokens (for "
                        "grpo/rloo it is the longest prompt); raise it", where=where)
    prompts = [prompt_column[i] for i in sources]
    others = [c for c in rows.column_names if c != "prompt"]
    columns = {name: [values[i] for i in sources] for name, values in
               ((c, rows[c]) for c in others)}
    tokens = sum(len(i) for i in ids)
    stats.update(truncated=0, dropped=0, prompt_too_long=too_long, identical=0, images_cut=0, sequences=len(ids),
                 without_loss=0, rows_out=len(ids), tokens=tokens, trained_tokens=0,
                 packing_efficiency=tokens / (len(ids) * data.max_length))
    return PromptSplit(ids, prompts, columns)
