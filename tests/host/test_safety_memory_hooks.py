"""The pack's caches follow ComfyUI's memory management: emptied when ComfyUI unloads all models (what
/free does) or has to unload models to make room; kept otherwise."""

import comfy.model_management as mm
import pytest
from support import tiny_encoders
from support.host_support import attention_paths, module_shapes, tiny_sd15, write_kohya_lora


@pytest.fixture
def filled(pack, tmp_path):
    from plora_pack.plora_core.encoders import ENCODER_CACHE, load_open_clip_encoder
    from plora_pack.plora_core.lora_file import LORA_CACHE

    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    subject = write_kohya_lora(tmp_path / "subject.safetensors", shapes, seed=1)
    style = write_kohya_lora(tmp_path / "style.safetensors", shapes, seed=2)
    _, paths = tiny_encoders.build_tiny_clip(str(tmp_path))
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"])
    assert LORA_CACHE.info()["entries"] == 2 and ENCODER_CACHE.info()["entries"] == 1
    return {"loras": LORA_CACHE, "encoders": ENCODER_CACHE, "pair": pair, "encoder": encoder, "model": model,
            "files": (subject, style)}


def test_unload_all_models_empties_the_caches(pack, filled):
    assert getattr(mm.unload_all_models, "__plora_release_callbacks__", None)
    mm.unload_all_models()  # what POST /free {"unload_models": true} and ComfyUI's OOM handler call
    assert filled["loras"].info()["entries"] == 0 and filled["encoders"].info()["entries"] == 0
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(filled["files"][0]), 1.0, str(filled["files"][1]), 1.0)
    assert pair.subject.file is not filled["pair"].subject.file, "read again after the release"
    assert filled["loras"].info()["entries"] == 2


def test_free_memory_empties_the_caches_only_when_it_unloaded_models(pack, filled):
    device = mm.get_torch_device()
    mm.free_memory(1e30, device)  # nothing loaded: nothing unloaded
    assert filled["loras"].info()["entries"] == 2 and filled["encoders"].info()["entries"] == 1
    mm.load_models_gpu([filled["model"]])
    assert mm.free_memory(1e30, device), "the model was unloaded to make room"
    assert filled["loras"].info()["entries"] == 0 and filled["encoders"].info()["entries"] == 0


def test_hooks_are_installed_once_and_keep_the_host_functions(pack):
    hooks = pack.glue.memory_hooks
    for name in ("unload_all_models", "free_memory"):
        hooked = getattr(mm, name)
        callbacks = hooked.__plora_release_callbacks__
        assert hooks.release_caches in callbacks and callbacks.count(hooks.release_caches) == 1
        assert not hasattr(hooked.__wrapped__, "__plora_release_callbacks__"), "wrapped exactly once"
    hooks.install_memory_hooks()
    assert mm.unload_all_models.__plora_release_callbacks__.count(hooks.release_caches) == 1


def test_unload_all_models_also_empties_k_lora_top_k_sums(pack, filled):
    """Module-level caches of the glue are registered with the memory hooks too."""
    pack.nodes.PLoRAModelPatcher().patch(filled["model"], filled["pair"], "kl", 1.0, 0.0, 1.0, method="k-lora")
    assert len(pack.glue.gate._KLORA_SCORES) > 0
    mm.unload_all_models()
    assert len(pack.glue.gate._KLORA_SCORES) == 0
