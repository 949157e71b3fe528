import torch

from plora_pack.plora_core.deltas import LayerDelta, LayerGeometry, LowRankPart
from plora_pack.plora_core.gate import gate
from plora_pack.plora_core.gate import LayerGate
from plora_pack.plora_core.recorder import STYLE, SUBJECT, GateState


def direct_eq_9_13(w0, dw_c, dw_s, x):
    """The paper's equations written out with materialised weights, one sample at a time."""
    outs, choices = [], []
    for xb in x:
        f = xb @ w0.T                      # F_{i+1}
        fc = xb @ (w0 + dw_c).T            # Eq. 9
        fs = xb @ (w0 + dw_s).T            # Eq. 10
        p, pc, ps = (torch.softmax(t.double(), -1) for t in (f, fc, fs))
        d_c = (pc * (pc.log() - p.log())).sum(-1).mean()   # Eq. 11
        d_s = (ps * (ps.log() - p.log())).sum(-1).mean()   # Eq. 12
        take_subject = bool(d_c >= d_s)                    # Eq. 13
        outs.append(fc if take_subject else fs)
        choices.append(take_subject)
    return torch.stack(outs), choices


def test_gate_reproduces_equations_9_to_13_per_sample():
    torch.manual_seed(0)
    w0 = torch.randn(16, 12)
    dw_c = torch.randn(16, 4) @ torch.randn(4, 12) * 0.3
    dw_s = torch.randn(16, 4) @ torch.randn(4, 12) * 0.3
    x = torch.randn(6, 10, 12)
    x[3:] *= 3.0  # different inputs -> different decisions are possible
    expected, choices = direct_eq_9_13(w0, dw_c, dw_s, x)
    base = x @ w0.T
    out, mask = gate(base, base + x @ dw_c.T, base + x @ dw_s.T, "kl", 1.0, -1)
    assert mask.tolist() == choices
    assert torch.allclose(out, expected, atol=1e-5)


def test_decisions_differ_between_samples_when_inputs_differ():
    torch.manual_seed(1)
    w0 = torch.randn(8, 8)
    # the subject LoRA only acts on the first 4 input channels, the style on the last 4
    dw_c = torch.zeros(8, 8)
    dw_c[:, :4] = torch.randn(8, 4)
    dw_s = torch.zeros(8, 8)
    dw_s[:, 4:] = torch.randn(8, 4)
    x = torch.zeros(2, 5, 8)
    x[0, :, :4] = torch.randn(5, 4) * 2
    x[1, :, 4:] = torch.randn(5, 4) * 2
    base = x @ w0.T
    _, mask = gate(base, base + x @ dw_c.T, base + x @ dw_s.T)
    assert mask.tolist() == [True, False]


def test_style_bias_moves_ties_towards_style():
    base = torch.zeros(1, 2, 4)
    same = torch.ones(1, 2, 4) * torch.tensor([0.0, 1.0, 0.0, 0.0])
    _, paper = gate(base, same, same, "kl", 1.0)
    _, biased = gate(base, same, same, "kl", 1.5)
    assert paper.tolist() == [True] and biased.tolist() == [False]


def _linear_delta(up, down, scale=1.0):
    return LayerDelta(LayerGeometry("linear", up.shape[0], down.shape[1]), [LowRankPart(up, down, scale)])


def test_gated_forward_records_every_call_and_obeys_the_window():
    torch.manual_seed(2)
    layer = torch.nn.Linear(6, 5)
    up_c, down_c, up_s, down_s = torch.randn(5, 2), torch.randn(2, 6), torch.randn(5, 2), torch.randn(2, 6)
    state = GateState(sigma_high=10.0, sigma_low=1.0)
    gated = LayerGate("blk.proj", _linear_delta(up_c, down_c), _linear_delta(up_s, down_s), state).bind(layer.forward)
    x = torch.randn(3, 4, 6)
    for sigma in [14.0, 8.0, 3.0, 0.5]:
        state.begin_model_call(sigma)
        out = gated(x)
        base = layer(x)
        both = base + x @ (up_c @ down_c).T + x @ (up_s @ down_s).T
        if sigma > 10.0 or sigma < 1.0:
            assert torch.allclose(out, both, atol=1e-5), "outside the window both deltas merge"
        else:
            expected, _ = gate(base, base + x @ (up_c @ down_c).T, base + x @ (up_s @ down_s).T)
            assert torch.allclose(out, expected, atol=1e-5)
    rec = state.recorder
    assert rec.steps() == [1, 2] and rec.layers() == ["blk.proj"]
    assert rec.choice(1, "blk.proj", 0) in (SUBJECT, STYLE)
    state.begin_model_call(14.0)  # sigma rises: a new run clears the record
    assert rec.steps() == [] and state.step == 0


def test_step_index_follows_the_samplers_schedule_when_known():
    state = GateState()
    schedule = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    for sigma, expected in [(14.6, 0), (7.0, 1), (5.0, 2), (3.0, 2), (1.0, 3)]:
        state.begin_model_call(sigma, schedule)
        assert state.step == expected


def divergence64(base, delta, criterion, channel_dim):
    """Each criterion's definition in float64, per sample (Eq. 11-12, Table 4)."""
    f, tuned = base.double(), base.double() + delta.double()
    log_p, log_q = torch.log_softmax(tuned, channel_dim), torch.log_softmax(f, channel_dim)
    p, q = log_p.exp(), log_q.exp()
    m = (p + q) / 2
    per_token = {
        "kl": lambda: (p * (log_p - log_q)).sum(channel_dim),
        "js": lambda: 0.5 * (p * (p / m).log()).sum(channel_dim) + 0.5 * (q * (q / m).log()).sum(channel_dim),
        "cosine": lambda: 1 - torch.nn.functional.cosine_similarity(tuned, f, dim=channel_dim),
        "dot": lambda: (f * f).sum(channel_dim) - (tuned * f).sum(channel_dim),
    }[criterion]()
    return per_token.reshape(per_token.shape[0], -1).mean(1)


def test_gate_from_deltas_decides_like_the_float64_definitions_for_every_criterion():
    from plora_pack.plora_core.divergence import DIVERGENCES
    from plora_pack.plora_core.gate import gate_deltas

    assert set(DIVERGENCES) == {"kl", "js", "cosine", "dot"}
    torch.manual_seed(3)
    for channel_dim, shape in ((-1, (4, 9, 16)), (1, (4, 16, 3, 3))):
        base = torch.randn(shape) * 4
        delta_c, delta_s = torch.randn(shape), torch.randn(shape)
        delta_s[:2] *= 3  # some samples must pick the style, others the subject
        for criterion in DIVERGENCES:
            expected_mask = divergence64(base, delta_c, criterion, channel_dim) >= divergence64(
                base, delta_s, criterion, channel_dim)
            out, mask = gate_deltas(base, delta_c, delta_s, criterion, 1.0, channel_dim)
            assert mask.tolist() == expected_mask.tolist(), criterion
            expected = torch.where(expected_mask.reshape(-1, *[1] * (len(shape) - 1)), base + delta_c, base + delta_s)
            assert torch.equal(out, expected)
            reference_out, reference_mask = gate(base, base + delta_c, base + delta_s, criterion, 1.0, channel_dim)
            assert reference_mask.tolist() == mask.tolist() and torch.equal(reference_out, out)


def test_gate_deltas_reads_the_deltas_and_keeps_the_models_dtype():
    from plora_pack.plora_core.gate import gate_deltas

    torch.manual_seed(4)
    base = (torch.randn(3, 7, 12) * 5).half()
    delta_c, delta_s = torch.randn(3, 7, 12).half(), (torch.randn(3, 7, 12) * 2).half()
    copies = delta_c.clone(), delta_s.clone()
    for criterion in ("kl", "js", "cosine", "dot"):
        out, mask = gate_deltas(base, delta_c, delta_s, criterion)
        assert out.dtype == torch.float16 and mask.dtype == torch.bool and mask.shape == (3,)
        assert torch.equal(delta_c, copies[0]) and torch.equal(delta_s, copies[1])


def test_gate_deltas_passes_gradients_through_the_chosen_output():
    """Exact guidance backpropagates through gated layers: the chosen F + D must stay differentiable."""
    from plora_pack.plora_core.gate import gate_deltas

    torch.manual_seed(8)
    base = (torch.randn(2, 5, 16) * 4).requires_grad_()
    delta_c = torch.randn(2, 5, 16).requires_grad_()
    delta_s = (torch.randn(2, 5, 16) * torch.tensor([3.0, 0.3]).reshape(2, 1, 1)).requires_grad_()
    for criterion in ("kl", "js", "cosine", "dot"):
        base.grad = delta_c.grad = delta_s.grad = None
        out, mask = gate_deltas(base, delta_c, delta_s, criterion)
        if criterion == "kl":
            assert mask.tolist() == [False, True]
        out.sum().backward()
        assert torch.equal(base.grad, torch.ones_like(base))
        for sample, take_subject in enumerate(mask.tolist()):
            chosen, other = (delta_c, delta_s) if take_subject else (delta_s, delta_c)
            assert torch.equal(chosen.grad[sample], torch.ones(5, 16)) and other.grad[sample].abs().sum() == 0


def test_rows_that_are_not_the_calls_images_get_both_loras_and_no_decision():
    """A layer whose input rows are tokens flattened over the batch (MoE experts) has no per-image choice."""
    torch.manual_seed(3)
    layer = torch.nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.mul_(400.0)  # outputs of std in the hundreds, as a real layer's
    up_c, down_c, up_s, down_s = (torch.randn(48, 4) * 0.01, torch.randn(4, 64), torch.randn(48, 4) * 0.01,
                                  torch.randn(4, 64))
    state = GateState()
    gated = LayerGate("ff.experts.0.w1", _linear_delta(up_c, down_c), _linear_delta(up_s, down_s), state).bind(
        layer.forward)
    state.begin_model_call(5.0, batch=2)
    tokens = torch.randn(7, 64)  # 7 routed tokens of a 2-image call
    out = gated(tokens)
    expected = layer(tokens) + tokens @ (up_c @ down_c).T + tokens @ (up_s @ down_s).T
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-3)
    assert state.recorder.decisions == {}
    images = torch.randn(2, 10, 64)
    gated(images)
    assert list(state.recorder.decisions) == [(0, "ff.experts.0.w1")]
    assert state.recorder.decisions[(0, "ff.experts.0.w1")].shape == (2,)


def test_on_a_device_without_float64_the_divergences_finish_on_the_cpu(monkeypatch):
    """Apple's MPS has no float64: the rule finishes the per-token parts on the CPU, with the same decisions.

    (That no layer-sized tensor is copied there is checked in test_fused_gate.py.)
    """
    import plora_pack.plora_core.gate as gate_module

    torch.manual_seed(4)
    base = torch.randn(3, 256, 320) * 70
    subject, style = torch.randn(3, 256, 320) * 0.05, torch.randn(3, 256, 320) * 0.05
    subject[0] *= 3
    style[2] *= 3
    rule = gate_module.DivergenceRule()
    expected = rule("layer", base, subject, style, -1)
    seen = []
    original = gate_module.shift_divergences
    def spy(b, deltas, *rest):
        seen.append((b.device.type, rest[-1]))
        return original(b, deltas, *rest)

    monkeypatch.setattr(gate_module, "shift_divergences", spy)
    monkeypatch.setattr(gate_module, "FLOAT64_LESS_DEVICES", frozenset({"cpu"}))
    got = rule("layer", base.requires_grad_(True), subject, style, -1)
    assert torch.equal(got, expected) and expected.tolist() == [True, False, False]
    assert seen == [("cpu", torch.device("cpu"))], "the float64 finish is asked to run on the CPU"


# ---------------------------------------------------------------- N LoRAs (Eq. 13 as an argmax)

def _real_layer(out_features, in_features, seed, logit_std=60.0):
    """A Linear whose outputs have the spread of a real SDXL layer's (std of tens), and its input."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=generator) * logit_std / in_features ** 0.5)
    return layer, generator


def test_n_loras_pass_on_the_argmax_of_the_weighted_float64_divergences():
    """N = 3 and 4 at an unbalanced real width: each sample's output is F + D_k of the k maximising
    w_k d_k, with d_k the float64 KL of Eq. 11 written out from the materialised F + D_k."""
    for count, width, seed in ((3, 1280, 5), (4, 640, 6)):
        layer, generator = _real_layer(width, 320, seed)
        ups = [torch.randn(width, 16, generator=generator) * 0.05 * (k + 1) for k in range(count)]
        downs = [torch.randn(16, 320, generator=generator) * 0.05 for _ in range(count)]
        x = torch.randn(count + 2, 24, 320, generator=generator)
        for sample in range(count):  # each LoRA made to move one sample the most
            downs_sample = downs[sample]
            x[sample] += 3.0 * downs_sample[0]
        weights = tuple(1.0 + 0.1 * k for k in range(count))
        state = GateState()
        state.begin_model_call(5.0)
        rule = gate_module().DivergenceRule(weights=weights)
        gate_ = LayerGate("blk.proj", state=state, rule=rule,
                          deltas=[_linear_delta(u, d) for u, d in zip(ups, downs)])
        with torch.no_grad():
            out = gate_.forward(layer.forward, x)
            base = layer(x)
            tuned = [base + x @ (u @ d).T for u, d in zip(ups, downs)]
        kl = torch.stack([divergence64(base, t - base, "kl", -1) for t in tuned])  # [N, B]
        expected_choice = (kl * torch.tensor(weights, dtype=torch.float64)[:, None]).argmax(0)
        assert len(set(expected_choice.tolist())) > 1, "the case must exercise several winners"
        assert state.recorder.choices[(0, "blk.proj")].tolist() == expected_choice.float().tolist()
        for sample, k in enumerate(expected_choice.tolist()):
            assert torch.allclose(out[sample], tuned[k][sample], rtol=1e-5, atol=1e-3), (count, sample)


def gate_module():
    import plora_pack.plora_core.gate as module
    return module


def test_a_lora_with_a_huge_weight_wins_everywhere_and_members_name_the_set_positions():
    layer, generator = _real_layer(96, 48, 7)
    deltas = [_linear_delta(torch.randn(96, 4, generator=generator) * 0.1, torch.randn(4, 48, generator=generator))
              for _ in range(3)]
    state = GateState()
    state.begin_model_call(3.0)
    rule = gate_module().DivergenceRule(weights=(1.0, 1.0, 1.0, 1e9))  # the set's LoRA 3 dominates
    gated = LayerGate("blk.proj", state=state, rule=rule, deltas=deltas, members=(0, 2, 3))
    x = torch.randn(4, 10, 48, generator=generator)
    with torch.no_grad():
        out = gated.forward(layer.forward, x)
        assert torch.allclose(out, layer(x) + deltas[2](x), atol=1e-4)
    assert state.recorder.choices[(0, "blk.proj")].tolist() == [3.0] * 4
    state.recorder.roles = ("subject", "style", "subject", "style")
    assert state.recorder.decisions[(0, "blk.proj")].tolist() == [False] * 4  # LoRA 3 is a style


def test_two_loras_as_a_set_decide_exactly_as_the_pair_rule_for_every_criterion():
    """deltas=[c, s] with weights (1, bias) is the paper's `d_c >= bias * d_s` bit for bit (outputs and masks)."""
    layer, generator = _real_layer(320, 160, 8)
    subject = _linear_delta(torch.randn(320, 8, generator=generator) * 0.05, torch.randn(8, 160, generator=generator))
    style = _linear_delta(torch.randn(320, 8, generator=generator) * 0.05, torch.randn(8, 160, generator=generator))
    x = torch.randn(6, 33, 160, generator=generator)
    x[:3] += 2.0 * subject.low_rank[0].down[0]  # the first samples move with the subject, the others with the style
    x[3:] += 2.0 * style.low_rank[0].down[0]
    for criterion in ("kl", "js", "cosine", "dot"):
        for bias in (1.0, 1.3):
            state = GateState()
            state.begin_model_call(2.0)
            rule = gate_module().DivergenceRule(criterion, bias)
            gated = LayerGate("l", deltas=[subject, style], state=state, rule=rule)
            with torch.no_grad():
                out = gated.forward(layer.forward, x)
                base = layer(x)
                d_c, d_s = gated.deltas(x)  # the layer's own deltas (one stacked GEMM), as the pair gate forms them
                _, expected_mask = gate(base, base + d_c, base + d_s, criterion, bias)
                pair_mask = gate_module().choose_subject(
                    *gate_module().delta_divergences(base, d_c, d_s, criterion, -1), bias)
            assert state.recorder.decisions[(0, "l")].tolist() == pair_mask.tolist() == expected_mask.tolist()
            assert bias != 1.0 or 0 < sum(pair_mask.tolist()) < len(pair_mask), "both LoRAs must win somewhere"
            expected = torch.where(pair_mask.reshape(-1, 1, 1), base + d_c, base + d_s)
            assert torch.equal(out, expected), (criterion, bias)
