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


def test_one_colour_per_lora_of_a_set_and_a_legend_naming_the_files():
    from plora_pack.plora_core.selection_map import LEGEND_ROW, LORA_COLOURS

    recorder = SelectionRecorder(roles=("subject", "style", "subject"), names=("dog.safetensors", "ink.safetensors",
                                                                               "cat.safetensors"))
    recorder.record(0, "a", torch.tensor([1, 0]), members=(0, 2))  # a layer two of the three LoRAs touch: local indices
    recorder.record(0, "b", torch.tensor([1, 2]), members=(0, 1, 2))
    assert recorder.choices[(0, "a")].tolist() == [2.0, 0.0] and recorder.choices[(0, "b")].tolist() == [1.0, 2.0]
    assert recorder.decisions[(0, "a")].tolist() == [True, True], "both picks there are subjects"
    assert recorder.decisions[(0, "b")].tolist() == [False, True]
    image = selection_map(recorder, sample=0, cell=1)
    assert image.shape[1] == 2 + LEGEND_ROW * (3 + 2) + 4 and image.shape[2] > 1
    assert torch.allclose(image[0, 0, 0], torch.tensor(LORA_COLOURS[2]))  # layer a, sample 0 took the set's LoRA 2
    assert torch.allclose(image[0, 1, 0], torch.tensor(LORA_COLOURS[1]))
    second = selection_map(recorder, sample=1, cell=1)
    assert torch.allclose(second[0, 0, 0], torch.tensor(LORA_COLOURS[0]))
    assert torch.allclose(second[0, 1, 0], torch.tensor(LORA_COLOURS[2]))
    legend = image[0, 2:]
    swatches = {tuple(round(v, 2) for v in px.tolist()) for px in legend.reshape(-1, 3)}
    assert all(tuple(round(c, 2) for c in colour) in swatches for colour in LORA_COLOURS[:3])


def test_a_very_long_file_name_is_cut_in_the_legend_not_widening_the_map():
    from plora_pack.plora_core.selection_map import LEGEND_WIDTH

    recorder = SelectionRecorder(names=("a" * 12_000 + ".safetensors", "ink.safetensors"))
    recorder.record(0, "a", torch.tensor([0, 1]), members=(0, 1))
    image = selection_map(recorder, cell=1)
    assert image.shape[2] <= LEGEND_WIDTH + 22
