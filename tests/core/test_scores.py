"""The PMK score R of Eq. 16-19 against a hand computation, with tiny random CLIP and DINO encoders."""

import pytest
from support import tiny_encoders
import torch
import torch.nn.functional as F

from plora_pack.plora_core import encoders
from plora_pack.plora_core.encoders import load_dino_encoder, load_open_clip_encoder
from plora_pack.plora_core.image_preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from plora_pack.plora_core.scores import (
    CLIP_CONTENT,
    CLIP_STYLE,
    DINO_STYLE,
    ReferenceEmbeddings,
    embed_references,
    metric_residual,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    encoders.clear_encoder_cache()
    root = tmp_path_factory.mktemp("tiny_scores")
    clip_model, clip_paths = tiny_encoders.build_tiny_clip(str(root))
    dino_model, dino_folder = tiny_encoders.build_tiny_dinov2(str(root / "dinov2"))
    generator = torch.Generator().manual_seed(3)
    subject = torch.rand(2, 3, 40, 56, generator=generator)  # two I_c_ref, another size than x0
    style = torch.rand(1, 3, 64, 64, generator=generator)    # one I_s_ref for the whole batch
    x0 = torch.rand(3, 3, 48, 48, generator=generator)
    clip = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, clip_paths["safetensors"])
    dino = load_dino_encoder(dino_folder)
    refs = embed_references(clip, dino, subject, style)
    return {"clip_model": clip_model, "dino_model": dino_model, "clip": clip, "dino": dino,
            "subject": subject, "style": style, "x0": x0, "refs": refs}


def hand_terms(s):
    """Eq. 16-18 written out with the in-memory models: mean over references of the cosine."""
    def clip_embed(x):
        return F.normalize(s["clip_model"].encode_image(preprocess(x, 32, OPENAI_MEAN, OPENAI_STD)), dim=-1)

    def dino_embed(x):
        pixels = preprocess(x, 32, IMAGENET_MEAN, IMAGENET_STD, resize_size=40)
        return F.normalize(s["dino_model"](pixel_values=pixels).last_hidden_state[:, 0], dim=-1)

    with torch.no_grad():
        gen_clip, gen_dino = clip_embed(s["x0"]), dino_embed(s["x0"])
        content = torch.stack([(gen_clip * ref).sum(-1) for ref in clip_embed(s["subject"])]).mean(0)
        clip_style = (gen_clip * clip_embed(s["style"])[0]).sum(-1)
        dino_style = (gen_dino * dino_embed(s["style"])[0]).sum(-1)
    return content, clip_style, dino_style


def test_residual_matches_hand_computation_of_eq_19(setup):
    content, clip_style, dino_style = hand_terms(setup)
    with torch.no_grad():
        r, terms = metric_residual(setup["x0"], setup["clip"], setup["dino"], setup["refs"])
    assert r.shape == (3,)
    torch.testing.assert_close(terms[CLIP_CONTENT], content, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[CLIP_STYLE], clip_style, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[DINO_STYLE], dino_style, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, 1 - (content + clip_style + dino_style) / 3, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(terms[CLIP_CONTENT], terms[CLIP_STYLE])


def test_weighted_residual_and_equal_default(setup):
    content, clip_style, dino_style = hand_terms(setup)
    with torch.no_grad():
        r_default, _ = metric_residual(setup["x0"], setup["clip"], setup["dino"], setup["refs"])
        r_scaled, _ = metric_residual(setup["x0"], setup["clip"], setup["dino"], setup["refs"], weights=(2, 2, 2))
        r_weighted, _ = metric_residual(setup["x0"], setup["clip"], setup["dino"], setup["refs"], weights=(3, 1, 0.5))
    torch.testing.assert_close(r_default, r_scaled)
    torch.testing.assert_close(r_weighted, 1 - (3 * content + clip_style + 0.5 * dino_style) / 4.5,
                               atol=1e-5, rtol=1e-5)


def test_zero_weight_drops_term_and_encoder(setup):
    content, clip_style, dino_style = hand_terms(setup)
    with torch.no_grad():
        r, terms = metric_residual(setup["x0"], setup["clip"], None, setup["refs"], weights=(1, 1, 0))
        assert set(terms) == {CLIP_CONTENT, CLIP_STYLE}
        torch.testing.assert_close(r, 1 - (content + clip_style) / 2, atol=1e-5, rtol=1e-5)
        r, terms = metric_residual(setup["x0"], None, setup["dino"], setup["refs"], weights=(0, 0, 1))
        assert set(terms) == {DINO_STYLE}
        torch.testing.assert_close(r, 1 - dino_style, atol=1e-5, rtol=1e-5)


def test_missing_encoder_or_reference_raises(setup):
    x0, refs = setup["x0"], setup["refs"]
    with pytest.raises(ValueError, match="DINO encoder"):
        metric_residual(x0, setup["clip"], None, refs)
    with pytest.raises(ValueError, match="CLIP encoder"):
        metric_residual(x0, None, setup["dino"], refs, weights=(0, 1, 1))
    no_subject = ReferenceEmbeddings(clip_style=refs.clip_style, dino_style=refs.dino_style)
    with pytest.raises(ValueError, match="subject reference"):
        metric_residual(x0, setup["clip"], setup["dino"], no_subject)
    metric_residual(x0, setup["clip"], setup["dino"], no_subject, weights=(0, 1, 1))
    for bad in [(1, -1, 1), (0, 0, 0), (1, 1), (1, float("nan"), 1)]:
        with pytest.raises(ValueError, match="weights"):
            metric_residual(x0, setup["clip"], setup["dino"], refs, weights=bad)


def test_reference_embeddings_are_unit_norm_and_plain_under_inference_mode(setup):
    with torch.inference_mode():
        subject = setup["subject"].clone()  # inference tensors, as ComfyUI IMAGE inputs are
        refs = embed_references(setup["clip"], setup["dino"], subject, setup["style"].clone())
    for name, tensor in [("clip_subject", refs.clip_subject), ("clip_style", refs.clip_style),
                         ("dino_style", refs.dino_style)]:
        assert not tensor.is_inference() and not tensor.requires_grad, name
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(tensor.shape[0]))
    assert refs.clip_subject.shape == (2, 16) and refs.dino_style.shape == (1, 32)
    x0 = setup["x0"].clone().requires_grad_(True)
    r, _ = metric_residual(x0, setup["clip"], setup["dino"], refs)
    r.sum().backward()
    assert x0.grad.abs().sum() > 0


def test_gradient_descent_on_pixels_lowers_residual(setup):
    x0 = setup["x0"].clone().requires_grad_(True)
    history = []
    for _ in range(5):
        r, _ = metric_residual(x0, setup["clip"], setup["dino"], setup["refs"])
        history.append(r.detach())
        (grad,) = torch.autograd.grad(r.sum(), x0)
        with torch.no_grad():
            x0 -= 0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    final, _ = metric_residual(x0.detach(), setup["clip"], setup["dino"], setup["refs"])
    assert (final < history[0] - 1e-3).all(), (history[0], final)


# ---------------------------------------------------------------- N LoRAs: one reference per LoRA

def test_extended_residual_matches_the_formula_written_out_with_three_references(setup):
    """Two subjects (the pair's subject reference and one more at a = 0.5) and a style: R of the module's
    extended Eq. 19, against the hand-computed cosines."""
    from plora_pack.plora_core.scores import embed_more_references

    generator = torch.Generator().manual_seed(9)
    second_subject = torch.rand(1, 3, 36, 36, generator=generator)
    more = embed_more_references(setup["clip"], setup["dino"], [("subject", 0.5, second_subject)])
    assert more[0].dino is None, "a subject reference takes no DINO term"
    refs = ReferenceEmbeddings(setup["refs"].clip_subject, setup["refs"].clip_style, setup["refs"].dino_style, more)
    content, clip_style, dino_style = hand_terms(setup)
    with torch.no_grad():
        def embed(images):
            pixels = preprocess(images, 32, OPENAI_MEAN, OPENAI_STD)
            return F.normalize(setup["clip_model"].encode_image(pixels), dim=-1)
        gen, ref2 = embed(setup["x0"]), embed(second_subject)
        content2 = (gen * ref2[0]).sum(-1)
        w1, w2, w3 = 2.0, 1.0, 0.5
        expected = 1 - (w1 * (content + 0.5 * content2) + w2 * clip_style + w3 * dino_style) / (w1 * 1.5 + w2 + w3)
        r, terms = metric_residual(setup["x0"], setup["clip"], setup["dino"], refs, weights=(w1, w2, w3))
    assert torch.allclose(r, expected, atol=1e-5), (r, expected, terms, content, content2)
    assert torch.allclose(terms[CLIP_CONTENT], (content + 0.5 * content2) / 1.5, atol=1e-5)


def test_a_reference_at_weight_zero_leaves_the_pairs_residual(setup):
    from plora_pack.plora_core.scores import embed_more_references

    generator = torch.Generator().manual_seed(10)
    more = embed_more_references(setup["clip"], setup["dino"], [("style", 0.0, torch.rand(2, 3, 30, 30,
                                                                                          generator=generator))])
    refs = ReferenceEmbeddings(setup["refs"].clip_subject, setup["refs"].clip_style, setup["refs"].dino_style, more)
    with torch.no_grad():
        pair, _ = metric_residual(setup["x0"], setup["clip"], setup["dino"], setup["refs"])
        extended, _ = metric_residual(setup["x0"], setup["clip"], setup["dino"], refs)
    assert torch.allclose(pair, extended, atol=1e-6)


def test_a_reference_with_an_unknown_role_is_refused(setup):
    from plora_pack.plora_core.scores import embed_more_references

    with pytest.raises(ValueError, match="subject or style"):
        embed_more_references(setup["clip"], None, [("lighting", 1.0, setup["style"])])
