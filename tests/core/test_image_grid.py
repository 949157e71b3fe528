"""The comparison grid: every image lands in its cell, unchanged, under its label."""

import torch

from plora_pack.plora_core.image_grid import labelled_grid


def test_images_are_placed_unchanged_in_one_row_under_their_labels():
    images = torch.rand(4, 48, 40, 3)
    grid = labelled_grid(images, ["Direct merge", "PFK", "PMK", "P-LoRA"], gap=4)
    label = 16
    assert grid.shape == (1, 48 + label, 4 * 40 + 3 * 4, 3)
    for i in range(4):
        left = i * 44
        assert torch.equal(grid[0, label:, left:left + 40], images[i])
        strip = grid[0, :label, left:left + 40]
        assert strip.min() < 0.5 and strip.max() == 1.0  # dark text on white


def test_columns_wrap_and_missing_labels_stay_blank():
    images = torch.rand(3, 20, 20, 3)
    grid = labelled_grid(images, ["only one"], columns=2, gap=0)
    assert grid.shape == (1, 2 * 36, 40, 3)
    assert torch.equal(grid[0, 36 + 16:, :20], images[2])
    assert torch.all(grid[0, :16, 20:40] == 1.0)  # the second image has no label: a blank strip
    assert torch.all(grid[0, 36:, 20:] == 1.0)  # the empty fourth cell


def test_no_labels_draw_no_strip():
    images = torch.rand(2, 10, 10, 3)
    grid = labelled_grid(images, [], gap=2)
    assert grid.shape == (1, 10, 22, 3)


def test_a_long_label_is_cut_with_a_few_measurements_and_fits(monkeypatch):
    """12,000 characters on a 64 px image: cut by a binary search bounded by what the strip can hold
    (about log2 of it in measurements), not one character per full re-measure."""
    from PIL import ImageDraw

    calls, lengths = [], []
    real = ImageDraw.ImageDraw.textlength

    def counting(self, text, *args, **kwargs):
        calls.append(1)
        lengths.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "textlength", counting)
    grid = labelled_grid(torch.rand(1, 64, 64, 3), ["label " * 2000], gap=0)
    assert grid.shape == (1, 64 + 16, 64, 3)
    assert len(calls) <= 16, len(calls)
    assert max(lengths) <= 4 * 64, max(lengths)  # never the whole 12,000 characters


def test_fitted_text_is_the_longest_prefix_that_fits():
    from plora_pack.plora_core.image_grid import fitted_text

    def width(text):
        return 2.0 * len(text)

    assert fitted_text("short", width, 10) == "short"
    assert fitted_text("abcdefghij", width, 15) == "abcd..."  # 7 characters = 14 px
    assert fitted_text("abcdefghij" * 1000, width, 15) == "abcd..."
    assert fitted_text("abcdefghij", width, 5) == ""  # not even the ellipsis fits
    for room in range(6, 40):
        shown = fitted_text("x" * 500, width, room)
        assert width(shown) <= room and width(shown[:-3] + "x...") > room
