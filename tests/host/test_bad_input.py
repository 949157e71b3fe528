"""Bad input gets a clear error naming the file or layer, and the received MODEL is never changed."""

import logging

import pytest
import torch
from support.host_support import attention_paths, module_shapes, tiny_sd15, write_kohya_lora, write_peft_lora
from safetensors.torch import save_file


@pytest.fixture
def model():
    return tiny_sd15()


@pytest.fixture
def good_files(tmp_path, model):
    shapes = module_shapes(model, attention_paths(model))
    return (write_kohya_lora(tmp_path / "subject.safetensors", shapes),
            write_peft_lora(tmp_path / "style.safetensors", model, shapes))


def load(pack, subject, style, s1=1.0, s2=1.0):
    return pack.nodes.LoadSubjectStyleLoRA().load(str(subject), s1, str(style), s2)[0]


def patch(pack, model, pair):
    return pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]


def assert_untouched(model):
    assert not model.patches and not model.object_patches
    assert "model_function_wrapper" not in model.model_options


def test_lora_for_another_architecture_names_file_and_families(pack, model, good_files, tmp_path):
    flux = tmp_path / "flux_style.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)}, str(flux))
    pair = load(pack, good_files[0], flux)
    with pytest.raises(ValueError, match=r"flux_style\.safetensors matches none.*SD1\.5.*Flux"):
        patch(pack, model, pair)
    assert_untouched(model)


def test_partial_match_warns_with_counts(pack, model, good_files, tmp_path, caplog):
    shapes = module_shapes(model, attention_paths(model))
    partial = write_kohya_lora(tmp_path / "partial.safetensors", shapes)
    tensors = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(partial)))
    tensors["lora_unet_input_blocks_9_1_proj_in.lora_down.weight"] = torch.randn(4, 32)
    tensors["lora_unet_input_blocks_9_1_proj_in.lora_up.weight"] = torch.randn(32, 4)
    save_file(tensors, str(partial))
    with caplog.at_level(logging.WARNING, logger="plora"):
        patch(pack, model, load(pack, partial, good_files[1]))
    assert f"{len(shapes)} of {len(shapes) + 1} diffusion-model modules match" in caplog.text
    assert "partial.safetensors" in caplog.text


@pytest.mark.parametrize("shared", [True, False])
def test_shape_mismatch_names_the_layer(pack, model, good_files, tmp_path, shared):
    paths = attention_paths(model)
    shapes = module_shapes(model, paths)
    target = paths[0] if shared else "diffusion_model.middle_block.1.proj_out"
    shapes[target] = (shapes[paths[0]][0], 48)  # wrong input width
    bad = write_kohya_lora(tmp_path / "wrong.safetensors", shapes)
    with pytest.raises(ValueError, match=rf"{target}.*wrong\.safetensors.*another base model"):
        patch(pack, model, load(pack, bad, good_files[1]))
    assert_untouched(model)


def test_truncated_file_names_the_file(pack, good_files, tmp_path):
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(good_files[0].read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.safetensors could not be read.*download or export it again"):
        load(pack, broken, good_files[1])


def test_nan_in_a_lora_names_the_tensor(pack, good_files, tmp_path):
    tensors = {"lora_unet_middle_block_1_proj_in.lora_down.weight": torch.tensor([[float("nan"), 1.0]]),
               "lora_unet_middle_block_1_proj_in.lora_up.weight": torch.ones(2, 1)}
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"nan\.safetensors: tensor 'lora_unet_middle_block_1_proj_in\.lora_down"):
        load(pack, tmp_path / "nan.safetensors", good_files[1])


def test_missing_file_is_named(pack, good_files, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="absent"):
        load(pack, tmp_path / "absent.safetensors", good_files[1])


def test_both_strengths_zero_returns_the_model_itself(pack, model, good_files):
    assert patch(pack, model, load(pack, *good_files, 0.0, 0.0)) is model


def test_one_strength_zero_is_a_plain_merge_of_the_other(pack, model, good_files):
    patched = patch(pack, model, load(pack, *good_files, 0.0, 1.0))
    assert not pack.glue.gate.gated_layers(patched) and patched.patches
    assert_untouched(model)


def test_window_start_after_end_is_refused(pack, model, good_files):
    with pytest.raises(ValueError, match="start_percent"):
        pack.nodes.PLoRAModelPatcher().patch(model, load(pack, *good_files), "kl", 1.0, 0.8, 0.2)


def test_parsed_files_are_cached_by_path_and_mtime(pack, good_files):
    first = load(pack, *good_files)
    again = load(pack, *good_files)
    assert first.subject.file is again.subject.file
    import os
    stat = os.stat(good_files[0])
    os.utime(good_files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load(pack, *good_files).subject.file is not first.subject.file
