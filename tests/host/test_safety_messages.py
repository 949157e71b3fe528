"""Messages that tell the truth: a text-encoder-only LoRA, a gate window that held no step, an image index
past the batch, metadata routes that name files by their model-folder name."""

import pytest
import torch
from support.host_support import attention_paths, module_shapes, sample, tiny_sd15, write_kohya_lora
from safetensors.torch import save_file

STEPS = 3


def write_text_encoder_only(path):
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for key in ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, 32, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(32, 4, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


class MustNotBeUsed:
    def __getattr__(self, name):
        pytest.fail(f"the CLIP was used ({name}) although the pair was refused")


@pytest.fixture
def model_and_files(tmp_path):
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    return (model, write_kohya_lora(tmp_path / "subject.safetensors", shapes, seed=1),
            write_kohya_lora(tmp_path / "style.safetensors", shapes, seed=2),
            write_text_encoder_only(tmp_path / "te_only.safetensors"))


@pytest.mark.parametrize("role", ["subject", "style"])
def test_a_text_encoder_only_lora_is_refused_before_anything_is_applied(pack, model_and_files, role):
    _, subject, style, te_only = model_and_files
    files = {"subject": subject, "style": style, role: te_only}
    with pytest.raises(ValueError, match=rf"The {role} LoRA \S*te_only.safetensors holds only text-encoder weights "
                                         r"\(no diffusion-model layers\).*Load LoRA node"):
        pack.nodes.LoadSubjectStyleLoRA().load(str(files["subject"]), 1.0, str(files["style"]), 1.0, MustNotBeUsed())


def test_a_text_encoder_only_lora_at_strength_zero_is_left_out(pack, model_and_files):
    model, subject, _, te_only = model_and_files
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(te_only), 0.0)
    patched = pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0]
    assert patched.patches and not pack.glue.gate.gated_layers(patched)  # a plain merge of the subject LoRA


def gated(pack, model_and_files, start, end):
    model, subject, style, _ = model_and_files
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    return pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, start, end)[0]


LATENT = {"samples": torch.zeros(1, 4, 8, 8)}  # the sampler's output: only orders the node after sampling


def test_an_empty_gate_window_is_said_plainly_and_does_not_fail(pack, model_and_files):
    patched = gated(pack, model_and_files, 0.9, 0.95)  # sigmas 0.34 to 0.18: no step of a 3-step run (14.6, 1.6, 0.03)
    node = pack.nodes.PLoRASelectionMap()
    with pytest.raises(ValueError, match="has not been sampled"):
        node.draw(patched, LATENT, 0, "positive (cond)", 4)
    sample(patched, steps=STEPS)
    out = node.draw(patched, LATENT, 0, "positive (cond)", 4)
    (note,) = out["ui"]["text"]
    assert "gate window" in note and f"held none of the last run's {STEPS} step(s)" in note
    assert "sampler" not in note
    (image,) = out["result"]
    layers = len(pack.glue.gate.gated_layers(patched))
    assert image.shape == (1, layers * 4, STEPS * 4, 3)
    from plora_pack.plora_core.selection_map import UNSEEN_COLOUR

    assert torch.allclose(image[0, 1::4, 1::4], torch.tensor(UNSEEN_COLOUR))


def test_an_image_index_past_the_batch_is_refused(pack, model_and_files):
    patched = gated(pack, model_and_files, 0.0, 1.0)
    sample(patched, steps=STEPS, latent_shape=(2, 4, 8, 8),
           positive=[[torch.randn(2, 77, 32), {}]], negative=[[torch.randn(2, 77, 32), {}]])
    node = pack.nodes.PLoRASelectionMap()
    for index in (0, 1):
        (image,) = node.draw(patched, LATENT, index, "negative (uncond)", 4)
        assert image.shape[2] >= STEPS * 4  # the map, and the legend under it (which may be wider)
    with pytest.raises(ValueError, match=r"image_index 2 is past the batch: the last run made 2 image\(s\), "
                                         r"so image_index goes from 0 to 1"):
        node.draw(patched, LATENT, 2, "positive (cond)", 4)


def test_metadata_routes_name_files_relative_to_the_model_folder(pack, tmp_path):
    from plora_pack.plora_core.lora_file import LoraFileError

    (tmp_path / "sub").mkdir()
    corrupt = tmp_path / "sub" / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    routes = pack.glue.routes
    with pytest.raises(LoraFileError) as info:
        routes.lora_details(str(corrupt), "sub/corrupt.safetensors")
    assert "sub/corrupt.safetensors" in str(info.value) and str(tmp_path) not in str(info.value)
    good = write_text_encoder_only(tmp_path / "sub" / "te.safetensors")
    details = routes.lora_details(str(good), "sub/te.safetensors")
    assert details["name"] == "sub/te.safetensors" and details["family"] == "SD1.5"
    assert set(routes.cache_details()) == {"loras", "encoders"}
