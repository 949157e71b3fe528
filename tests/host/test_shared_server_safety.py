"""A shared server that one bad prompt cannot stall or poison (issue 19), at the host tier: file names
that are not UTF-8 shown escaped and without server paths, a huge open_clip architecture for a small
checkpoint refused before anything is built, NaN scores refused, ComfyUI's interruption honoured in the
pack's loops, and the frontend routes reading headers off the event loop, once per file version."""

import asyncio
import json
import os
import threading

import pytest
import torch
from support.host_support import attention_paths, module_shapes, tiny_sd15, write_kohya_lora
from safetensors.torch import save_file

LATIN1 = b"caf\xe9"  # 'café' in Latin-1: not valid UTF-8, as an unzipped Latin-1 archive leaves it
ESCAPED = "caf\\xe9"


def non_utf8(folder, suffix: str) -> str:
    """A path in `folder` whose last part is b'caf\\xe9' + suffix (a str with a lone surrogate)."""
    return os.path.join(str(folder), os.fsdecode(LATIN1 + suffix.encode()))


def assert_printable(message: str, *server_paths) -> None:
    message.encode("utf-8")  # strict: a lone surrogate here kills the server's log writer
    for path in server_paths:
        assert str(path) not in message and os.fsencode(str(path)).decode("utf-8", "replace") not in message


@pytest.fixture
def good_lora(tmp_path):
    return write_kohya_lora(tmp_path / "subject.safetensors", module_shapes(tiny_sd15(), attention_paths(tiny_sd15())))


def test_a_lora_with_a_non_utf8_name_loads_and_is_named_escaped(pack, tmp_path, good_lora):
    name = non_utf8(tmp_path, ".safetensors")
    os.replace(good_lora, name)
    other = write_kohya_lora(tmp_path / "style.safetensors", module_shapes(tiny_sd15(), attention_paths(tiny_sd15())))
    pair = pack.nodes.LoadSubjectStyleLoRA().load(name, 1.0, str(other), 1.0)[0]
    assert pair.subject.name == f"{tmp_path.name}/{ESCAPED}.safetensors"
    assert pair.subject.file.tensors and pair.subject.name.encode("utf-8")
    patched = pack.nodes.PLoRAModelPatcher().patch(tiny_sd15(), pair, "kl", 1.0, 0.0, 1.0)[0]
    assert pack.glue.gate.gated_layers(patched)


def test_a_broken_lora_with_a_non_utf8_name_gets_a_printable_message_without_paths(pack, tmp_path, good_lora):
    name = non_utf8(tmp_path, ".safetensors")
    with open(name, "wb") as handle:
        handle.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    with pytest.raises(ValueError) as info:
        pack.nodes.LoadSubjectStyleLoRA().load(name, 1.0, str(good_lora), 1.0)
    message = str(info.value)
    assert f"{ESCAPED}.safetensors could not be read" in message, message
    assert_printable(message, tmp_path)
    with pytest.raises(FileNotFoundError) as info:  # a name that is not there: ComfyUI's wording, escaped
        pack.nodes.LoadSubjectStyleLoRA().load(os.fsdecode(b"absent\xe9.safetensors"), 1.0, str(good_lora), 1.0)
    assert "absent\\xe9.safetensors' not found" in str(info.value)
    assert_printable(str(info.value))


def test_shown_name_escapes_only_what_is_not_utf8(pack):
    shown_name = pack.plora_core.files.shown_name
    assert shown_name(os.fsdecode(b"caf\xe9/\x82\xa0.safetensors")) == "caf\\xe9/\\x82\\xa0.safetensors"
    assert shown_name("café 猫.safetensors") == "café 猫.safetensors"
    assert shown_name("lone \ud800") == "lone \\ud800"  # a surrogate no file name decodes to (JSON '\ud800')


def test_clip_and_dino_with_non_utf8_names(pack, tmp_path, encoder_files):
    from support import tiny_encoders

    clip_file, dino_folder = encoder_files
    clip = non_utf8(tmp_path, ".safetensors")
    with open(clip_file, "rb") as source, open(clip, "wb") as target:
        target.write(source.read())
    node = pack.nodes.LoadPLoRACLIPEncoder()
    (encoder,) = node.load(clip, tiny_encoders.TINY_CLIP_ARCH, "fp32")
    assert ESCAPED in encoder.name and encoder.embed(torch.rand(1, 3, 32, 32)).shape == (1, 16)
    with pytest.raises(ValueError) as info:
        node.load(clip, "ViT-B-32", "fp32")
    assert f"{ESCAPED}.safetensors does not fit open_clip architecture 'ViT-B-32'" in str(info.value)
    assert_printable(str(info.value), tmp_path)

    folder = non_utf8(tmp_path, "_dino")
    os.mkdir(folder)
    for entry in os.listdir(dino_folder):
        with open(os.path.join(dino_folder, entry), "rb") as source, open(os.path.join(folder, entry), "wb") as out:
            out.write(source.read())
    with pytest.raises(ValueError) as info:
        pack.nodes.LoadPLoRADINOEncoder().load(folder, "fp32")
    message = str(info.value)
    assert f"DINO folder {tmp_path.name}/{ESCAPED}_dino: its name is not valid UTF-8" in message, message
    assert_printable(message, tmp_path)


def peak_rss_reset() -> bool:
    """Reset this process's peak resident size (Linux: /proc/self/clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_huge_architecture_for_a_small_checkpoint_is_refused_before_it_is_built(pack, encoder_files):
    """ViT-bigG-14's image tower is 1.8 G parameters (7 GB in float32): the mismatch must be found from
    open_clip's model config and the file's shapes alone."""
    import open_clip

    if not peak_rss_reset():
        pytest.skip("no /proc/self/clear_refs here: the peak resident size cannot be measured")
    config = open_clip.get_model_config("ViT-bigG-14")["vision_cfg"]
    big_bytes = 4 * config["layers"] * 12 * config["width"] ** 2  # float32, about 12 width^2 per block
    assert big_bytes > 5 * 1024 ** 3
    clip_file, _ = encoder_files
    before = os.stat("/proc/self/status") and peak_rss()
    with pytest.raises(ValueError) as info:
        pack.plora_core.encoders.load_open_clip_encoder("ViT-bigG-14", clip_file, label="tiny_clip.safetensors")
    grown = peak_rss() - before
    message = str(info.value)
    assert "tiny_clip.safetensors does not fit open_clip architecture 'ViT-bigG-14'" in message
    assert "width 32, 2 layers, patch 8, embedding 16" in message and "width 1664, 48 layers, patch 14" in message
    assert "PLoRA-Tiny-ViT" in message  # the architecture that fits is named
    assert grown < 256 * 1024 ** 2, f"peak resident size grew by {grown / 1024 ** 2:.0f} MiB"


def test_nan_scores_are_refused_not_put_into_the_ui_output(pack, encoders):
    from plora_pack.plora_core.encoders import ImageEncoder

    class Overflowing(ImageEncoder):
        """An encoder whose embedding overflowed (fp16): NaN features for finite pixels."""

        def features(self, pixels):
            return torch.full((pixels.shape[0], 4), float("nan"))

    broken = Overflowing("overflowing", image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    images = torch.rand(2, 8, 8, 3)
    score = pack.nodes.PLoRAScore().score
    with pytest.raises(ValueError, match=r"PLoRAScore: image 0 scores NaN or infinite for Style Sim, CLIP Score"):
        score(images, images, images, broken, encoders[1])
    with pytest.raises(ValueError, match="PLoRAScore: input 'images' holds NaN"):
        score(torch.full((1, 8, 8, 3), float("nan")), images, images, *encoders)
    out = score(images, images, images, *encoders)
    json.dumps(out["ui"], allow_nan=False)  # what ComfyUI writes into /history: standard JSON


@pytest.fixture
def interrupted():
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)
    yield comfy.model_management.InterruptProcessingException
    comfy.model_management.interrupt_current_processing(False)


def test_the_packs_long_loops_stop_on_interrupt(pack, interrupted, encoders, good_lora):
    with pytest.raises(interrupted):
        pack.nodes.PLoRAComparisonGrid().draw(torch.rand(2, 64, 64, 3), "x" * 12_000, 0)
    pack.glue.host.stop_if_interrupted()  # ComfyUI clears the flag when it raises: set it again
    import comfy.model_management

    comfy.model_management.interrupt_current_processing(True)
    images = torch.rand(1, 8, 8, 3)
    with pytest.raises(interrupted):
        pack.nodes.PLoRAScore().score(images, images, images, *encoders)
    comfy.model_management.interrupt_current_processing(True)
    pack.plora_core.lora_file.clear_lora_cache()
    with pytest.raises(interrupted):
        pack.nodes.LoadSubjectStyleLoRA().load(str(good_lora), 1.0, str(good_lora), 1.0)


def test_loops_take_a_callback_and_plora_core_imports_no_comfy(pack):
    from plora_pack.plora_core.image_grid import labelled_grid

    calls = []

    def stop():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        labelled_grid(torch.rand(5, 8, 8, 3), ["a"] * 5, should_stop=stop)
    assert len(calls) == 2
    core = os.path.join(os.path.dirname(pack.__file__), "plora_core")
    for name in os.listdir(core):
        if name.endswith(".py"):
            with open(os.path.join(core, name), encoding="utf-8") as handle:
                text = handle.read()
            assert "import comfy" not in text and "from comfy" not in text, name


def write_many_keys(path, keys: int) -> None:
    """A valid safetensors file with `keys` one-value tensors: a huge header over a tiny payload."""
    save_file({f"lora_unet_block_{i}.lora_down.weight": torch.zeros(1, 1) for i in range(keys)}, str(path))


def test_routes_read_headers_off_the_event_loop_once_per_file_version(pack, tmp_path, monkeypatch):
    routes = pack.glue.routes
    big = tmp_path / "many_keys.safetensors"
    write_many_keys(big, 200_000)
    threads, reads = [], []
    real = routes.lora_details

    def recording(path, name):
        threads.append(threading.current_thread())
        reads.append(path)
        return real(path, name)

    recording.__name__ = real.__name__
    monkeypatch.setattr(routes, "_details_cache", type(routes._details_cache)())

    async def eight_requests():
        loop_thread = threading.current_thread()
        answers = await asyncio.gather(*(routes.answer(recording, "loras", str(big)) for _ in range(8)))
        return loop_thread, answers

    loop_thread, answers = asyncio.run(eight_requests())
    assert len(reads) == 1 and threads[0] is not loop_thread  # read once, in a worker thread
    status, body = answers[0]
    assert status == 200 and body["name"] == f"{tmp_path.name}/many_keys.safetensors" and body["rank"] == 1
    assert all(answer == answers[0] for answer in answers)
    stat = os.stat(big)
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # a new version of the file: read again
    asyncio.run(routes.answer(recording, "loras", str(big)))
    assert len(reads) == 2
    assert asyncio.run(routes.answer(recording, "loras", "absent.safetensors"))[0] == 404


def test_the_details_cache_is_bounded(pack, tmp_path, monkeypatch):
    routes = pack.glue.routes
    monkeypatch.setattr(routes, "_details_cache", type(routes._details_cache)())
    monkeypatch.setattr(routes, "DETAILS_CACHE_ENTRIES", 3)
    for i in range(5):
        path = tmp_path / f"f{i}.safetensors"
        save_file({"a": torch.zeros(1)}, str(path))
        routes.cached_details(routes.lora_details, str(path), path.name)
    assert len(routes._details_cache) == 3


def test_a_header_past_the_limit_is_refused_without_reading_it(pack, tmp_path):
    path = tmp_path / "huge_header.safetensors"
    with open(path, "wb") as handle:
        handle.write((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="huge_header.safetensors could not be read .*header length"):
        pack.plora_core.lora_file.read_header(str(path), "huge_header.safetensors")
