"""N LoRAs in one gate (issue 18), on tiny SD1.5, SDXL and Flux models built by ComfyUI.

The oracle for every gated call is written out independently of the pack's delta and divergence code:
each LoRA's layer weight as ComfyUI's own LoraLoader merges it (`load_lora_for_models`), the outputs
F and F + D_i of that Linear in float64, the KL of Eq. 11 per token averaged per sample, and Eq. 13 as
an argmax of the weighted divergences over the LoRAs touching the layer (per row slice on Flux's fused
layers).
"""

import comfy.sd
import comfy.utils
import pytest
import torch
from support.host_support import (attention_paths, module_shapes, sample, sdxl_conditioning,
                                  tiny_flux, tiny_sd15, tiny_sdxl, write_kohya_lora)
from test_flux import ai_toolkit_lora, flux_sample

STEPS = 3


def merged_weights(pack, model, files, patched) -> dict:
    """{(LoRA index, path): the layer's weight as ComfyUI's LoraLoader merges that LoRA (strength 1)} for every
    gated layer, and {(None, path): the base weight}; read before anything samples (fresh weights)."""
    gates = pack.glue.gate.gated_layers(patched)
    weights = {(None, path): model.get_model_object(path).weight.detach().double().clone() for path in gates}
    for index, file in enumerate(files):
        merged = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(file)), 1.0, 0.0)[0]
        merged.patch_model()
        try:
            for path, gate in gates.items():
                if index in gate.members:
                    weights[(index, path)] = merged.get_model_object(path).weight.detach().double().clone()
        finally:
            merged.unpatch_model()
    return weights


def kl64(base, tuned):
    """Eq. 11 in float64: KL(softmax(tuned) || softmax(base)) per token, averaged per sample. [B]"""
    log_q, log_p = torch.log_softmax(base, -1), torch.log_softmax(tuned, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).reshape(base.shape[0], -1).mean(1)


class CallLog:
    """Every LayerGate call: (name, step, x, output, recorded set indices per slice name)."""

    def __init__(self, pack, monkeypatch):
        self.calls = []
        real = pack.plora_core.gate.LayerGate.forward

        def spy(gate, original, x, *args, **kwargs):
            out = real(gate, original, x, *args, **kwargs)
            names = [gate.layer] if not gate.row_slices else [f"{gate.layer}[{p.name}]" for p in gate.row_slices]
            entries = gate.state.recorder.entries
            if gate.state.active and all((gate.state.step, n) in entries for n in names):
                chosen = {}
                for name in names:
                    value, members = entries[(gate.state.step, name)]
                    chosen[name] = [members[int(k)] for k in value.tolist()]
                self.calls.append((gate, x.detach().double().clone(), out.detach().double().clone(), chosen))
            return out
        monkeypatch.setattr(pack.plora_core.gate.LayerGate, "forward", spy)


def check_against_the_oracle(model, merged, weights, log, min_margin=0.02):
    """At every gated call: the recorded choice is the weighted float64 argmax and the output is F + D_chosen."""
    checked = 0
    for gate, x, out, chosen in log.calls:
        path = gate.layer
        module = model.get_model_object(path)
        bias = module.bias.detach().double() if module.bias is not None else None
        base = torch.nn.functional.linear(x, merged[(None, path)], bias)
        tuned = {member: torch.nn.functional.linear(x, merged[(member, path)], bias) for member in gate.members}
        slices = [(f"{path}[{p.name}]", p.start, p.length) for p in gate.row_slices] or [(path, 0, base.shape[-1])]
        for name, start, length in slices:
            cols = slice(start, start + length)
            divergences = {m: kl64(base[..., cols], t[..., cols]) * weights[m] for m, t in tuned.items()}
            stacked = torch.stack([divergences[m] for m in gate.members])  # [members, B]
            top2 = stacked.topk(min(2, len(gate.members)), dim=0).values
            for sample_index, chosen_member in enumerate(chosen[name]):
                expected = gate.members[int(stacked[:, sample_index].argmax())]
                if len(gate.members) > 1 and top2[0, sample_index] <= top2[1, sample_index] * (1 + min_margin):
                    continue  # too close to call in float32: either is right
                assert chosen_member == expected, (name, sample_index, stacked[:, sample_index])
                want = tuned[chosen_member][sample_index, ..., cols]
                got = out[sample_index, ..., cols]
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), name
                checked += 1
    return checked


def unet_case(pack, tmp_path, build, count, conditioning):
    model = build()
    attention = attention_paths(model)
    shapes = module_shapes(model, attention)
    files = [write_kohya_lora(tmp_path / f"lora{k}.safetensors", shapes, seed=10 + k) for k in range(count)]
    return model, files, lambda patched: sample(patched, steps=STEPS, positive=conditioning(1),
                                                negative=conditioning(2))


def loaded_set(pack, files, roles, biases=None):
    biases = biases or [1.0] * len(files)
    lora_set, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(files[0]), 1.0, str(files[1]), 1.0)
    for file, role, bias in zip(files[2:], roles[2:], biases[2:]):
        lora_set, _ = pack.nodes.AddLoRAToSet().add(lora_set, str(file), role, 1.0, bias)
    return lora_set


def sd15_conditioning_of(seed):
    from support.host_support import sd15_conditioning
    return sd15_conditioning(seed=seed)


CASES = {
    "SD1.5": (tiny_sd15, sd15_conditioning_of),
    "SDXL": (tiny_sdxl, sdxl_conditioning),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("count", [3, 4])
def test_every_gated_call_passes_on_the_weighted_argmax(pack, tmp_path, monkeypatch, family, count):
    build, conditioning = CASES[family]
    model, files, run = unet_case(pack, tmp_path, build, count, conditioning)
    roles = ["subject", "style", "subject", "style"][:count]
    biases = [1.0, 1.0, 0.9, 1.2][:count]
    lora_set = loaded_set(pack, files, roles, biases)
    style_bias = 1.1
    patched = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, "kl", style_bias, 0.0, 1.0)[0]
    merged = merged_weights(pack, model, files, patched)
    log = CallLog(pack, monkeypatch)
    run(patched)
    weights = [b * (style_bias if r == "style" else 1.0) for r, b in zip(roles, biases)]
    assert check_against_the_oracle(model, merged, weights, log) > 20
    winners = {m for _, _, _, chosen in log.calls for picks in chosen.values() for m in picks}
    assert len(winners) >= 2, "the case must exercise more than one winner"
    names = pack.glue.gate.gate_state_of(patched).recorder.names  # the selection map's legend
    assert len(names) == count and all(name.endswith(f.name) for name, f in zip(names, files))


@pytest.mark.parametrize("count", [3, 4])
def test_flux_fused_layers_gate_among_n_loras_per_row_slice(pack, tmp_path, monkeypatch, count):
    model = tiny_flux()
    files = [ai_toolkit_lora(tmp_path / f"flux{k}.safetensors", seed=20 + k) for k in range(count)]
    lora_set = loaded_set(pack, files, ["subject", "style", "style", "subject"][:count])
    patched = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, "kl", 1.0, 0.0, 1.0)[0]
    merged = merged_weights(pack, model, files, patched)
    log = CallLog(pack, monkeypatch)
    flux_sample(patched)
    assert check_against_the_oracle(model, merged, [1.0] * count, log) > 10
    assert all(len(gate.row_slices) > 1 for gate, *_ in log.calls), "Flux's qkv / linear1 gate per slice"


def test_a_lora_with_a_huge_bias_wins_everywhere_and_equals_comfyuis_merge_of_it(pack, tmp_path):
    model, files, run = unet_case(pack, tmp_path, tiny_sd15, 3, sd15_conditioning_of)
    lora_set = loaded_set(pack, files, ["subject", "style", "subject"])
    # past the node's bias range (0-100), so through the set itself
    from dataclasses import replace
    lora_set = replace(lora_set, loras=(*lora_set.loras[:2], replace(lora_set.loras[2], bias=1e20)))
    patched = pack.glue.gate.build_gated_model(model, lora_set, "kl", 1.0)
    third_alone = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(files[2])), 1.0, 0.0)[0]
    assert torch.allclose(run(patched), run(third_alone), rtol=1e-4, atol=1e-5)
    recorder = pack.glue.gate.gate_state_of(patched).recorder
    assert {float(v) for c in recorder.choices.values() for v in c} == {2.0}


def test_a_lora_on_some_layers_is_gated_only_there(pack, tmp_path, monkeypatch):
    model = tiny_sd15()
    attention = attention_paths(model)
    everywhere = module_shapes(model, attention)
    some = module_shapes(model, [p for p in attention if p.endswith(("to_q", "to_k"))])
    alone = module_shapes(model, [p for p in attention if ".attn2.to_out" in p][:1])
    files = [write_kohya_lora(tmp_path / "a.safetensors", everywhere, seed=1),
             write_kohya_lora(tmp_path / "b.safetensors", {**everywhere}, seed=2),
             write_kohya_lora(tmp_path / "c.safetensors", {**some, **alone}, seed=3)]
    lora_set = loaded_set(pack, files, ["subject", "style", "style"])
    patched = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, "kl", 1.0, 0.0, 1.0)[0]
    gates = pack.glue.gate.gated_layers(patched)
    assert set(gates) == set(everywhere)
    for path, gate in gates.items():
        assert gate.members == ((0, 1, 2) if path in some or path in alone else (0, 1)), path
    merged = merged_weights(pack, model, files, patched)
    log = CallLog(pack, monkeypatch)
    sample(patched, steps=STEPS)
    assert check_against_the_oracle(model, merged, [1.0, 1.0, 1.0], log) > 20


@pytest.mark.parametrize("criterion", ["kl", "js", "cosine", "dot"])
def test_two_loras_decide_and_render_exactly_as_the_pair_rule(pack, tmp_path, monkeypatch, criterion):
    """N = 2 is the paper's pair bit for bit: a rule written out with the pair's functions (subject iff
    d_c >= style_bias * d_s, today's rule) gives the same images and decisions as the N-LoRA gate."""
    gate_module = pack.plora_core.gate
    model, files, run = unet_case(pack, tmp_path, tiny_sd15, 2, sd15_conditioning_of)
    lora_set = loaded_set(pack, files, ["subject", "style"])
    style_bias = 1.05
    patched = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, criterion, style_bias, 0.0, 1.0)[0]
    image = run(patched)
    decisions = dict(pack.glue.gate.gate_state_of(patched).recorder.decisions)

    class PairRule:
        step_independent = True

        def choose(self, layer, base, deltas, channel_dim, members=(0, 1)):
            d_c, d_s = gate_module.delta_divergences(base, deltas[0], deltas[1], criterion, channel_dim)
            return (~gate_module.choose_subject(d_c, d_s, style_bias)).long()

    pair_patched = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, criterion, style_bias, 0.0, 1.0)[0]
    for gate in pack.glue.gate.gated_layers(pair_patched).values():
        gate.rule = PairRule()
        gate._rule_fuses = False
    pair_image = run(pair_patched)
    pair_decisions = pack.glue.gate.gate_state_of(pair_patched).recorder.decisions
    assert torch.equal(image, pair_image)
    assert decisions.keys() == pair_decisions.keys()
    assert all(torch.equal(decisions[k], pair_decisions[k]) for k in decisions)
    masks = torch.cat([m.float() for m in decisions.values()])
    assert 0 < float(masks.mean()) < 1, "both LoRAs win somewhere"


def test_direct_merges_all_and_pair_only_methods_refuse_more_than_the_pair(pack, tmp_path):
    model, files, run = unet_case(pack, tmp_path, tiny_sd15, 3, sd15_conditioning_of)
    lora_set = loaded_set(pack, files, ["subject", "style", "style"])
    direct = pack.nodes.PLoRAModelPatcher().patch(model, lora_set, "kl", 1.0, 0.0, 1.0, "direct")[0]
    chained = model
    for file in files:
        chained = comfy.sd.load_lora_for_models(chained, None, comfy.utils.load_torch_file(str(file)), 1.0, 0.0)[0]
    assert torch.allclose(run(direct), run(chained), rtol=1e-4, atol=1e-5)
    for method in ("k-lora", "b-lora"):
        with pytest.raises(ValueError, match=f"Method {method} is defined for one subject and one style LoRA"):
            pack.nodes.PLoRAModelPatcher().patch(model, lora_set, "kl", 1.0, 0.0, 1.0, method)
    assert not model.patches


def test_bad_sets_are_refused_up_front_naming_the_file(pack, tmp_path):
    model, files, _ = unet_case(pack, tmp_path, tiny_sd15, 3, sd15_conditioning_of)
    add = pack.nodes.AddLoRAToSet().add
    pair, _ = pack.nodes.LoadSubjectStyleLoRA().load(str(files[0]), 1.0, str(files[1]), 1.0)
    with pytest.raises(ValueError, match=r"LoRA .*lora1\.safetensors is already in the set"):
        add(pair, str(files[1]), "subject", 1.0, 1.0)
    with pytest.raises(ValueError, match="same file"):
        pack.nodes.LoadSubjectStyleLoRA().load(str(files[0]), 1.0, str(files[0]), 1.0)
    with pytest.raises(ValueError, match="role"):
        add(pair, str(files[2]), "lighting", 1.0, 1.0)
    flux_file = ai_toolkit_lora(tmp_path / "flux_lora.safetensors", seed=5)
    with pytest.raises(ValueError, match=r"flux_lora\.safetensors is a Flux"):
        add(pair, str(flux_file), "style", 1.0, 1.0)
    with pytest.raises(ValueError, match="two or more"):
        pack.glue.lora_pair.LoraSet(pair.loras[:1])
    from test_safety_messages import write_text_encoder_only
    te_only = write_text_encoder_only(tmp_path / "te_only.safetensors")
    with pytest.raises(ValueError, match=r"te_only\.safetensors holds only text-encoder weights.*set strength to 0"):
        add(pair, str(te_only), "style", 1.0, 1.0)
