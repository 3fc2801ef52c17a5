"""How many pixels an image dataset may decode: per image and per dataset, checked from each image's header.

Why: a PNG of a few kB can declare 12,000 × 12,000 pixels (144 Mpx; 432 MB as RGB, seconds of CPU to
inflate), and PIL only warns below 179 Mpx. ``Image.open`` reads the header and decodes nothing, so
:meth:`PixelCounter.admit` refuses such an image, or an archive of many large ones, before any pixel is
decoded. The API checks an upload against the :class:`PixelBudget` its settings give; the worker and
the CLI decode for a known model, whose input size tightens the per-image bound
(:meth:`PixelBudget.for_input_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from PIL import Image

from core.errors import DatasetError

MAX_IMAGE_PIXELS = 4096 * 4096
"""Default per-image bound (16.8 Mpx: a 4K frame is 8.3, a 12-megapixel photo 12)."""
MAX_DATASET_PIXELS = 2**31
"""Default bound on all the images of one dataset together (2.1 Gpx: about ten seconds of decoding)."""
MODEL_SIDE_FACTOR = 16
"""With the model's input size known, an image may be this many times its side (3584² for 224²)."""
MIN_IMAGE_PIXELS = 2048 * 2048
"""The per-image bound never drops below this for a small model: a 28 × 28 model may still be given
ordinary photos."""


@dataclass(frozen=True)
class PixelBudget:
    per_image: int = MAX_IMAGE_PIXELS
    total: int = MAX_DATASET_PIXELS

    def __post_init__(self) -> None:
        if self.per_image < 1 or self.total < 1:
            raise ValueError(f"pixel budgets must be positive, got {self.per_image} and {self.total}")

    def for_input_size(self, input_size: tuple[int, int, int] | list[int]) -> PixelBudget:
        """This budget for a model taking ``(C, H, W)``: per image at most ``MODEL_SIDE_FACTOR``² × H × W
        (never under ``MIN_IMAGE_PIXELS``, never over this budget's own bound)."""
        _, height, width = (int(v) for v in input_size)
        scaled = max(MIN_IMAGE_PIXELS, MODEL_SIDE_FACTOR**2 * height * width)
        return replace(self, per_image=min(self.per_image, scaled))


class PixelCounter:
    """Pixels admitted so far against one budget (one per dataset, or per upload)."""

    def __init__(self, budget: PixelBudget) -> None:
        self.budget = budget
        self.spent = 0

    def admit(self, image: Image.Image, name: str) -> None:
        """Raise ``DatasetError`` naming ``name`` and its size when the opened (not yet decoded) image
        would pass the per-image or the dataset's bound; count its pixels otherwise."""
        self.spent += check_image_size(image, name, self.budget.per_image)
        if self.spent > self.budget.total:
            raise DatasetError(
                f"the images up to {name} hold {self.spent:,} pixels; the limit is {self.budget.total:,} "
                "pixels per dataset (resize the images or upload fewer)"
            )


def check_image_size(image: Image.Image, name: str, per_image: int) -> int:
    """The opened (not yet decoded) image's pixel count; ``DatasetError`` naming it past ``per_image``."""
    width, height = image.size
    pixels = width * height
    if pixels > per_image:
        raise DatasetError(
            f"image {name} is {width} × {height} = {pixels:,} pixels; the limit is {per_image:,} pixels per "
            "image (resize it before uploading)"
        )
    return pixels
