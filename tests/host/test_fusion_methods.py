"""PLoRAModelPatcher's rival fusion rules (issue 11): direct, K-LoRA and B-LoRA, through the node.

Oracles: ComfyUI's own LoraLoader merge for `direct`; K-LoRA's rule written out here from the
dense dW of the LoRA files (torch.topk over |up @ down|, gamma, the linear time schedule of
their presets) for `k-lora`; the block names of B-LoRA's paper for `b-lora`.
"""

import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.utils
import pytest
import torch
from support.host_support import (SD15_TINY_UNET, _patcher, _randomise, attention_paths, kohya_key, module_shapes,
                                  sample, tiny_sd15)
from safetensors.torch import load_file, save_file

SUBJECT_RANK, STYLE_RANK = 4, 8


def write_lora(file, shapes, rank, seed, layer_scales):
    """kohya LoRA whose layers have unbalanced magnitudes (real LoRAs differ by 10x between layers)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, shape in shapes.items():
        key = kohya_key(path)
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, shape[1], generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, generator=generator) * 0.3 * layer_scales[path]
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, str(file))
    return file


def dense_delta(file, path):
    tensors = load_file(str(file))
    key = kohya_key(path)
    up, down = tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"]
    return (float(tensors[f"{key}.alpha"]) / down.shape[0]) * (up.double() @ down.double())


@pytest.fixture
def pair_files(tmp_path, pack):
    model = tiny_sd15()
    paths = attention_paths(model)
    shapes = module_shapes(model, paths)
    generator = torch.Generator().manual_seed(5)
    subject_scales = {p: float(torch.empty(1).uniform_(0.3, 3.0, generator=generator)) for p in paths}
    style_scales = {p: float(torch.empty(1).uniform_(0.3, 3.0, generator=generator)) for p in paths}
    subject = write_lora(tmp_path / "subject.safetensors", shapes, SUBJECT_RANK, 1, subject_scales)
    style = write_lora(tmp_path / "style.safetensors", shapes, STYLE_RANK, 2, style_scales)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    return model, pair, paths, subject, style


def patch(pack, model, pair, method, preset="s*"):
    return pack.nodes.PLoRAModelPatcher().patch(model, pair, "kl", 1.0, 0.0, 1.0, method, preset)[0]


def test_direct_equals_two_loraloaders(pack, pair_files):
    model, pair, _, subject, style = pair_files
    direct = patch(pack, model, pair, "direct")
    loaded = model
    for file in (subject, style):
        loaded = comfy.sd.load_lora_for_models(loaded, None, comfy.utils.load_torch_file(str(file)), 1.0, 0)[0]
    assert torch.allclose(sample(direct), sample(loaded), rtol=1e-5, atol=1e-5)
    assert not pack.glue.gate.gated_layers(direct), "direct merges, it gates nothing"
    state = pack.glue.gate.gate_state_of(direct)
    assert state.recorder.choice(0, sorted(state.recorder.layers())[0], 0) == "both", "the map shows both LoRAs"


def k_lora_oracle(subject, style, paths, sigmas, preset):
    """K-LoRA written out: {(step, layer): subject?} for an Euler run over `sigmas`."""
    k = SUBJECT_RANK * STYLE_RANK
    top, total = {}, {}
    for path in paths:
        dc, ds = dense_delta(subject, path).abs(), dense_delta(style, path).abs()
        top[path] = (float(dc.flatten().topk(k).values.sum()), float(ds.flatten().topk(k).values.sum()))
        total[path] = float(dc.sum()) / float(ds.sum())
    mean = sum(total.values()) / len(total)
    kept = [r for r in total.values() if r < 3 * mean]
    gamma = sum(kept) / len(kept)
    steps = len(sigmas) - 1
    expected = {}
    for step in range(steps):
        for j, path in enumerate(paths, start=1):
            t = ((step + j / len(paths)) / steps) % 1.0
            scale = 1.5 * t + 0.5 if preset == "s" else (1.5 * t + 1.5 * 0.85) % 1.5
            expected[(step, path)] = top[path][0] / gamma > scale * top[path][1]
    return expected


@pytest.mark.parametrize("steps,scheduler,preset", [(3, "normal", "s*"), (5, "karras", "s"), (8, "simple", "s*"),
                                                    (8, "karras", "s")])
def test_k_lora_choices_equal_its_rule_written_out(pack, pair_files, monkeypatch, steps, scheduler, preset):
    model, pair, paths, subject, style = pair_files
    patched = patch(pack, model, pair, "k-lora", preset)
    order = [name for name, _ in model.model.named_modules() if name in set(paths)]  # the order layers run

    topk_calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: topk_calls.append(1) or real_topk(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **kw: topk_calls.append(1) or real_topk(self, *a, **kw))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    comfy.sample.sample(patched, noise, steps, 4.0, "euler", scheduler, _cond(1), _cond(2), latent, disable_pbar=True)
    monkeypatch.undo()
    assert topk_calls == [], "no Top-K during sampling: the sums were computed when the pair was loaded"

    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    expected = k_lora_oracle(subject, style, order, sigmas.tolist(), preset)
    recorder = pack.glue.gate.gate_state_of(patched).recorder
    got = {(step, layer): bool(recorder.decisions[(step, layer)].all()) for step in range(steps) for layer in order}
    assert all(bool(m.all()) == bool(m.any()) for m in recorder.decisions.values()), "one choice per layer and step"
    assert got == expected
    assert 0 < sum(got.values()) < len(got), "the pair is balanced so that both LoRAs win somewhere"


def _cond(seed):
    from support.host_support import sd15_conditioning

    return sd15_conditioning(seed=seed)


SDXL_TINY_UNET = {**SD15_TINY_UNET, "adm_in_channels": 2816, "context_dim": 32, "num_head_channels": 16,
                  "num_heads": -1, "use_linear_in_transformer": True}


def tiny_sdxl():
    config = comfy.supported_models.SDXL(dict(SDXL_TINY_UNET))
    model = config.get_model({})
    _randomise(model, 0)
    return _patcher(model)


def test_b_lora_keeps_the_subject_in_the_content_block_and_the_style_in_the_style_block(pack, tmp_path):
    model = tiny_sdxl()
    assert pack.glue.host.model_family(model) == "SDXL"
    paths = attention_paths(model)
    content = [p for p in paths if p.startswith("diffusion_model.output_blocks.0.1.")]
    style_block = [p for p in paths if p.startswith("diffusion_model.output_blocks.1.1.")]
    assert content and style_block
    shapes = module_shapes(model, paths)
    ones = {p: 1.0 for p in paths}
    subject = write_lora(tmp_path / "subject.safetensors", shapes, SUBJECT_RANK, 1, ones)
    style = write_lora(tmp_path / "style.safetensors", shapes, STYLE_RANK, 2, ones)
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patched = patch(pack, model, pair, "b-lora")

    patched_layers = sorted({(key if isinstance(key, str) else key[0]).rpartition(".")[0] for key in patched.patches})
    assert patched_layers == sorted(content + style_block)
    for path in content + style_block:
        (entry,) = patched.patches[f"{path}.weight"]  # exactly one LoRA per layer
        up = entry[1].weights[0] if hasattr(entry[1], "weights") else entry[1][1][0]
        lora = subject if path in content else style
        assert torch.equal(up, load_file(str(lora))[f"{kohya_key(path)}.lora_up.weight"])
    assert not pack.glue.gate.gated_layers(patched)


def test_b_lora_on_another_architecture_says_what_to_do(pack, pair_files):
    model, pair, *_ = pair_files
    with pytest.raises(ValueError, match="B-LoRA routing is defined for SDXL only.*SD1.5"):
        patch(pack, model, pair, "b-lora")
    assert not model.patches and not pack.glue.gate.gated_layers(model)


def test_an_unknown_method_is_refused(pack, pair_files):
    model, pair, *_ = pair_files
    with pytest.raises(ValueError, match=r"PLoRAModelPatcher: input 'method' is 'zip-lora', which is not one of its "
                                         r"choices \('p-lora', 'direct', 'k-lora', 'b-lora'\)"):
        patch(pack, model, pair, "zip-lora")


def test_k_lora_runs_on_every_host_and_differs_from_direct(pack, pair_files):
    model, pair, paths, *_ = pair_files
    k_lora = patch(pack, model, pair, "k-lora")
    fused = sample(k_lora)
    recorder = pack.glue.gate.gate_state_of(k_lora).recorder
    assert sorted(recorder.layers()) == sorted(paths) and recorder.steps() == [0, 1, 2, 3]
    assert not torch.allclose(fused, sample(patch(pack, model, pair, "direct")), atol=1e-4)


def test_k_lora_top_k_sums_are_computed_once_per_pair_of_files(pack, pair_files, monkeypatch, tmp_path):
    model, pair, paths, subject, style = pair_files
    pack.glue.gate._KLORA_SCORES.clear()
    calls = []
    original = pack.glue.gate.klora_layer_scores
    monkeypatch.setattr(pack.glue.gate, "klora_layer_scores", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    first = patch(pack, model, pair, "k-lora", "s*")
    assert len(calls) == len(paths)
    second = patch(pack, model, pair, "k-lora", "s")  # another preset: the same sums
    assert len(calls) == len(paths)
    assert pack.glue.gate.gated_layers(second)[paths[0]].rule.rule.scores == \
        pack.glue.gate.gated_layers(first)[paths[0]].rule.rule.scores
    import os
    import time

    os.utime(subject, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: read and computed again
    patch(pack, model, pair, "k-lora", "s*")  # (the pair still holds the file as it was read: no new sums)
    assert len(calls) == len(paths)
    changed, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(subject), 1.0, str(style), 1.0)
    patch(pack, model, changed, "k-lora", "s*")
    assert len(calls) == 2 * len(paths)
