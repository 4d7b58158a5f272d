"""Every grid carries its captions: column captions (prompts, conditions) and row captions."""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffusers_spm.concept_world.experiments import write_grid
from diffusers_spm.grids import CAPTION_LINES, LINE_HEIGHT, ROW_LABEL_WIDTH, GridBlock, captioned_grid

HEADER = LINE_HEIGHT * CAPTION_LINES + 4


def ink(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels in `box`: text drawn there."""
    return int((np.asarray(image.crop(box).convert("L")) < 128).sum())


def test_captions_above_columns_and_left_of_rows():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    grid = captioned_grid([GridBlock(["a red circle", "a blue star"], [("no membrane", [red, blue]),
                                                                      ("with red", [blue, red])])], tile=64)
    assert grid.size == (ROW_LABEL_WIDTH + 2 * 64, HEADER + 2 * 64)
    assert ink(grid, (ROW_LABEL_WIDTH, 0, ROW_LABEL_WIDTH + 64, HEADER)) > 20  # "a red circle"
    assert ink(grid, (ROW_LABEL_WIDTH + 64, 0, ROW_LABEL_WIDTH + 128, HEADER)) > 20  # "a blue star"
    assert ink(grid, (0, HEADER, ROW_LABEL_WIDTH, HEADER + 64)) > 20  # "no membrane"
    assert ink(grid, (0, 0, ROW_LABEL_WIDTH, HEADER)) == 0  # the corner stays empty
    assert grid.getpixel((ROW_LABEL_WIDTH + 10, HEADER + 10)) == (255, 0, 0)
    assert grid.getpixel((ROW_LABEL_WIDTH + 64 + 10, HEADER + 64 + 10)) == (255, 0, 0)
    assert grid.getpixel((ROW_LABEL_WIDTH + 10, HEADER + 64 + 10)) == (0, 0, 255)


def test_concept_world_grid_has_a_caption_row_per_block(tmp_path):
    images = np.zeros((2, 32, 32, 3), dtype=np.float32)
    blocks = [(["a red circle (seed 0)", "a red star (seed 1)"], [("no membrane", images), ("with red", images + 1)]),
              (["a blue circle (seed 0)", "a blue star (seed 1)"], [("no membrane", images), ("with blue", images)])]
    path = write_grid(blocks, tmp_path / "grid.png", scale=2)
    grid = Image.open(path)
    assert grid.size == (ROW_LABEL_WIDTH + 2 * 64, 2 * (HEADER + 2 * 64))
    second_header = HEADER + 2 * 64
    assert ink(grid, (ROW_LABEL_WIDTH, second_header, ROW_LABEL_WIDTH + 64, second_header + HEADER)) > 20
    assert grid.getpixel((ROW_LABEL_WIDTH + 5, HEADER + 64 + 5)) == (255, 255, 255)  # "with red": images + 1
