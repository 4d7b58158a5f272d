"""Image grids that explain themselves: a caption above every column, one left of every row.

Every grid the package writes (the concept world's before/after grids, the evaluation report's) is
drawn here, so a reader sees which prompt and which condition each image shows without the docs.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

ROW_LABEL_WIDTH = 170
LINE_HEIGHT = 12
CAPTION_LINES = 3
CHAR_WIDTH = 6  # PIL's default bitmap font


@dataclass(frozen=True)
class GridBlock:
    """Rows of images under shared column captions (e.g. the prompts), each row with its caption."""

    columns: Sequence[str]
    rows: Sequence[tuple[str, Sequence[Image.Image]]]


def _wrap(text: str, width_px: int, lines: int) -> list[str]:
    wrapped = textwrap.wrap(text, max(4, width_px // CHAR_WIDTH)) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:-1] + "…"
    return wrapped


def captioned_grid(blocks: Sequence[GridBlock], tile: int, path: Path | None = None) -> Image.Image:
    """One image: per block a caption row, then its rows of `tile`-sized images with their captions.

    Saved to `path` when given."""
    font = ImageFont.load_default()
    num_columns = max(len(block.columns) for block in blocks)
    header = LINE_HEIGHT * CAPTION_LINES + 4
    height = sum(header + len(block.rows) * tile for block in blocks)
    grid = Image.new("RGB", (ROW_LABEL_WIDTH + num_columns * tile, height), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for block in blocks:
        for c, caption in enumerate(block.columns):
            for i, line in enumerate(_wrap(caption, tile - 4, CAPTION_LINES)):
                draw.text((ROW_LABEL_WIDTH + c * tile + 2, top + 2 + i * LINE_HEIGHT), line, fill="black", font=font)
        top += header
        for caption, images in block.rows:
            for i, line in enumerate(_wrap(caption, ROW_LABEL_WIDTH - 6, max(1, tile // LINE_HEIGHT))):
                draw.text((2, top + 2 + i * LINE_HEIGHT), line, fill="black", font=font)
            for c, image in enumerate(images):
                resample = Image.NEAREST if image.width < tile else Image.LANCZOS  # tiny pixels stay sharp
                grid.paste(image.convert("RGB").resize((tile, tile), resample), (ROW_LABEL_WIDTH + c * tile, top))
            top += tile
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return grid
