"""The `images` of a vision split's batches, decoded only for the rows of each batch (a split none of whose
rows holds an image has none: its batches carry no `images`).

A split never holds pixels: `ImageRows` keeps, for each of its rows, the row's index in the loaded data
(whose image columns are read undecoded: paths, bytes, datasets Image dicts) and the pan-and-scan crops
of each of its images (tokenised with it, `Tokenise`). `gather(rows, batch_size)` reads those rows'
images (`render.row_images`), decodes and preprocesses them (`images.open_image`, `images.preprocess`
at the architecture's `image_size` with the family's filter; an image with crops is followed by its
`images.pan_and_scan` crops) into float32 [batch_size, N, S, S, 3]: N = `slots`, the most images any row
of the split stands for, a row's images first and zeros after them; rows without images
and the padding rows of an epoch's last batch are all zeros. What a batch holds depends only on its
rows, so batches stay deterministic and resumable (batches.py).

An image that passed the checks at tokenise time but does not decode now (corrupt data, a file changed
since) is a DataError naming the file and the row.
"""

from __future__ import annotations

import numpy as np

from gemma_tune.data.images import FAMILY_RESAMPLE, ImageError, open_image, pan_and_scan, preprocess
from gemma_tune.data.layout import PAN_AND_SCAN, VisionLayout
from gemma_tune.data.render import row_images
from gemma_tune.errors import DataError


class ImageRows:
    """Per-row image references of a split (`refs`: (index in `data`, crops of each image) per row; a row
    without images has crops ()) and how to make their pixels."""

    def __init__(self, data, fmt: str, where: str, layout: VisionLayout, image_size: int,
                 refs: list[tuple[int, tuple[int, ...]]]):
        self.data, self.fmt, self.where, self.layout = data, fmt, where, layout
        self.size, self.resample = image_size, FAMILY_RESAMPLE[layout.family]
        self.refs = refs
        self.slots = max([1] + [sum(1 + c for c in crops) for _, crops in refs])

    def _row_images(self, index: int, crops: tuple[int, ...]) -> list[np.ndarray]:
        where = f"{self.where}: row {index + 1}"
        out = []
        for value, expected in zip(row_images(self.data[int(index)], self.fmt), crops):
            try:
                image = open_image(value, self.layout.base_dir)
            except ImageError as e:
                raise DataError(f"{e} (it passed the checks when the data was tokenised)", where=where) from e
            scans = pan_and_scan(image, **PAN_AND_SCAN) if expected else []
            if len(scans) != expected:
                raise DataError(f"an image gives {len(scans)} pan-and-scan crops, {expected} when the data was "
                                "tokenised: did its file change?", where=where)
            out += [preprocess(part, self.size, self.resample) for part in [image, *scans]]
        return out

    def gather(self, rows: np.ndarray, batch_size: int) -> np.ndarray:
        """float32 [batch_size, slots, S, S, 3]: the images of `rows` (indices into `refs`), then zeros."""
        out = np.zeros((batch_size, self.slots, self.size, self.size, 3), np.float32)
        for b, r in enumerate(rows):
            index, crops = self.refs[r]
            if crops:
                images = self._row_images(index, crops)
                out[b, :len(images)] = np.stack(images)
        return out
