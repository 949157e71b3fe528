import torch

from plora_pack.plora_core.recorder import COND, UNCOND, SelectionRecorder
from plora_pack.plora_core.selection_map import STYLE_COLOUR, SUBJECT_COLOUR, UNSEEN_COLOUR, selection_map


def test_cells_show_the_choice_per_step_and_layer_for_each_cfg_pass():
    recorder = SelectionRecorder()
    # step 0: layer "b" runs before "a"; rows = [cond image 0, cond image 1, uncond 0, uncond 1]
    recorder.record(0, "b", torch.tensor([True, False, False, False]), [COND, UNCOND])
    recorder.record(0, "a", torch.tensor([False, True, True, True]), [COND, UNCOND])
    recorder.record(1, "b", torch.tensor([False, False, True, True]), [COND, UNCOND])
    assert recorder.layers() == ["b", "a"]
    image = selection_map(recorder, sample=0, kind=COND, cell=1)
    assert image.shape == (1, 2, 2, 3)  # [1, layers, steps, 3]
    expect = {(0, 0): SUBJECT_COLOUR, (0, 1): STYLE_COLOUR, (1, 0): STYLE_COLOUR, (1, 1): UNSEEN_COLOUR}
    for (row, col), colour in expect.items():
        assert torch.allclose(image[0, row, col], torch.tensor(colour))
    uncond = selection_map(recorder, sample=1, kind=UNCOND, cell=1)
    assert torch.allclose(uncond[0, 0, 1], torch.tensor(SUBJECT_COLOUR))


def test_cell_size_scales_the_image():
    recorder = SelectionRecorder()
    recorder.record(0, "a", torch.tensor([True]))
    assert selection_map(recorder, cell=8).shape == (1, 8, 8, 3)
