"""PLoRAScore (paper Table 1 metrics) against cosines written out with the tiny models themselves."""

import math

import pytest
from support import tiny_encoders
import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default for an architecture without a tag
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def models_and_encoders(tmp_path_factory):
    """In-memory tiny CLIP and DINO models, and the same weights loaded from disk by the pack's loaders."""
    from plora_pack.plora_core.encoders import load_dino_encoder, load_open_clip_encoder

    folder = tmp_path_factory.mktemp("score_encoders")
    (folder / "dino").mkdir()
    clip_model, paths = tiny_encoders.build_tiny_clip(str(folder), seed=11)
    dino_model, _ = tiny_encoders.build_tiny_dino_v1(str(folder / "dino"), seed=12)
    return (clip_model, dino_model, load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"]),
            load_dino_encoder(str(folder / "dino")))


def normalised(images_bhwc, mean, std):
    """ComfyUI IMAGE [B, 32, 32, 3] (already the models' 32 px input) -> [B, 3, 32, 32], (x - mean) / std."""
    pixels = images_bhwc.permute(0, 3, 1, 2)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def cosine(a, b):
    a, b = a.double(), b.double()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_scores_equal_cosines_written_out(pack, models_and_encoders):
    clip_model, dino_model, clip_encoder, dino_encoder = models_and_encoders
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 32, 32, 3, generator=generator)     # three generated images
    subject = torch.rand(2, 32, 32, 3, generator=generator)    # two subject references: cosines averaged
    style = torch.rand(1, 32, 32, 3, generator=generator)
    images[1] = 0.7 * subject[0] + 0.3 * images[1]             # one image close to the subject
    images[2] = 0.8 * style[0] + 0.2 * images[2]                # one close to the style

    out = pack.nodes.score_node.PLoRAScore().score(images, subject, style, clip_encoder, dino_encoder)

    with torch.no_grad():
        clip = {name: clip_model.encode_image(normalised(x, OPENAI_MEAN, OPENAI_STD))
                for name, x in (("images", images), ("subject", subject), ("style", style))}
        dino = {name: dino_model(pixel_values=normalised(x, tiny_encoders.IMAGENET_MEAN,
                                                          tiny_encoders.IMAGENET_STD)).last_hidden_state[:, 0]
                for name, x in (("images", images), ("subject", subject))}
    expected = [{"style_sim": cosine(clip["images"][i], clip["style"][0]),
                 "clip_score": (cosine(clip["images"][i], clip["subject"][0])
                                + cosine(clip["images"][i], clip["subject"][1])) / 2,
                 "dino_score": (cosine(dino["images"][i], dino["subject"][0])
                                + cosine(dino["images"][i], dino["subject"][1])) / 2}
                for i in range(3)]

    per_image = out["ui"]["plora_scores"]
    assert len(per_image) == 3
    for got, want in zip(per_image, expected):
        assert got.keys() == want.keys()
        for name in want:
            assert math.isclose(got[name], want[name], abs_tol=2e-6), (name, got[name], want[name])
    # the image mixed with a subject reference is nearer the subject, the one mixed with the style nearer the style
    assert per_image[1]["clip_score"] > per_image[0]["clip_score"]
    assert per_image[2]["style_sim"] > per_image[0]["style_sim"]

    table, style_sim, clip_score, dino_score = out["result"]
    for name, value in (("style_sim", style_sim), ("clip_score", clip_score), ("dino_score", dino_score)):
        assert isinstance(value, float)
        assert math.isclose(value, sum(row[name] for row in expected) / 3, abs_tol=2e-6)
    assert out["ui"]["text"] == [table]
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "Style Sim" and lines[-2].split("|")[0].strip() == "mean"
    assert [float(cell) for cell in lines[3].split("|")[1:]] == pytest.approx(
        [expected[1][name] * 100 for name in ("style_sim", "clip_score", "dino_score")], abs=0.051)


def test_one_image_of_another_size_and_the_fixture_encoders(pack, encoders):
    clip_encoder, dino_encoder = encoders
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 96, 64, 3, generator=generator)      # portrait, resized and centre-cropped
    reference = image.clone()
    out = pack.nodes.score_node.PLoRAScore().score(image, reference, reference, clip_encoder, dino_encoder)
    # an image scored against itself: every cosine is 1
    assert out["result"][1:] == pytest.approx((1.0, 1.0, 1.0), abs=1e-6)
    assert "mean" not in out["result"][0]  # one image: no mean row


def test_node_is_registered_with_help_page_and_tooltips(pack):
    node = pack.NODE_CLASS_MAPPINGS["PLoRAScore"]
    assert node.OUTPUT_NODE and node.CATEGORY == "P-LoRA" and node.DESCRIPTION
    assert all(spec[1].get("tooltip") for spec in node.INPUT_TYPES()["required"].values())
    assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES) == len(node.RETURN_NAMES)
