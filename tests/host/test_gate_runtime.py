"""The gate runs on whichever model instance ComfyUI actually runs (issue: gates captured at patch time).

Newer ComfyUI builds new model instances for a patched MODEL (multi-GPU's deepclone_multigpu,
hooked conditioning, torch.compile): a clone whose `model` is a deep copy, with the clone's
object patches and wrappers. Gates bound to the first instance's layers would keep running
that instance's weights; gates installed at run time run the copy's.
"""

import copy

import comfy.model_management
import pytest
import torch
from support.host_support import sample, tiny_sd15_with_pair


@pytest.fixture
def gated(tmp_path, pack):
    model, pair, paths = tiny_sd15_with_pair(pack, tmp_path)
    return model, pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0)[0], paths


def rebuilt_like_newer_comfyui(model_patcher):
    """What ComfyUI's deepclone_multigpu does: a clone whose model is a deep copy of the original's."""
    rebuilt = model_patcher.clone()
    rebuilt.backup = copy.deepcopy(rebuilt.backup)
    rebuilt.object_patches_backup = copy.deepcopy(rebuilt.object_patches_backup)
    rebuilt.model = copy.deepcopy(rebuilt.model)
    return rebuilt


def test_a_rebuilt_model_instance_runs_gated_with_its_own_weights(gated, pack):
    model, patched, paths = gated
    fused = sample(patched)
    rebuilt = rebuilt_like_newer_comfyui(patched)
    assert rebuilt.model is not patched.model
    assert torch.equal(sample(rebuilt), fused), "the copy is the same model: the same image"
    state = pack.glue.gate.gate_state_of(rebuilt)
    assert state.recorder.steps() and len(state.recorder.layers()) == len(paths), "the copy ran gated"

    layer = next(p for p in paths if p.endswith("attn1.to_v"))  # (tiny random attention is near uniform in q, k)
    weight = rebuilt.model.get_submodule(layer).weight
    with torch.no_grad():
        weight.mul_(-4.0)
    changed = sample(rebuilt)
    assert not torch.allclose(changed, fused, atol=1e-5), "the copy's own layer runs inside the gate"

    # the same change on the original instance gives the same image: the copy ran the gate on its own layer
    original = model.model.get_submodule(layer).weight
    saved = original.detach().clone()
    with torch.no_grad():
        original.copy_(weight)
    try:
        assert torch.allclose(sample(patched), changed, rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            original.copy_(saved)
    assert torch.equal(sample(patched), fused)


def test_layers_are_put_back_after_every_model_call(gated):
    model, patched, paths = gated
    sample(patched)
    for path in paths:
        assert "forward" not in model.model.get_submodule(path).__dict__, "no gate left on the layer"
    assert not patched.object_patches, "the gate is a run-time wrapper, not an object patch"


def test_another_packs_object_patch_on_a_gated_layer_still_runs_inside_the_gate(gated):
    model, patched, paths = gated
    fused = sample(patched)
    calls = []
    layer = model.model.get_submodule(paths[0])

    def counting_forward(x, *args, **kwargs):
        calls.append(1)
        return type(layer).forward(layer, x, *args, **kwargs)

    other = patched.clone()
    other.add_object_patch(f"{paths[0]}.forward", counting_forward)
    assert torch.equal(sample(other), fused)
    assert calls, "the other pack's forward ran (inside the gate)"
    comfy.model_management.unload_all_models()
    left = layer.__dict__.get("forward")  # ComfyUI puts back the bound forward it saved
    assert left is None or getattr(left, "__func__", None) is type(layer).forward, "neither patch is left behind"
