"""What the pack opens, and how: regular files only, no pickle fallback, pickles only weights-only,
TorchScript archives read without running them, and messages that name files, not server paths."""

import io
import os
import pickle
import threading
import zipfile

import pytest
from support import tiny_encoders
import torch
from safetensors.torch import save_file

from plora_pack.plora_core import encoders
from plora_pack.plora_core.encoders import (EncoderLoadError, load_dino_encoder, load_open_clip_encoder,
                                            read_torchscript_tensors)
from plora_pack.plora_core.lora_file import LoraFileError, clear_lora_cache, read_header, read_lora_file


@pytest.fixture(autouse=True)
def fresh_caches():
    clear_lora_cache()
    encoders.clear_encoder_cache()
    yield
    clear_lora_cache()
    encoders.clear_encoder_cache()


def lora_tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"lora_unet_a.lora_down.weight": torch.randn(4, 32, generator=generator),
            "lora_unet_a.lora_up.weight": torch.randn(32, 4, generator=generator)}


def finishes_quickly(call, fifo=None, seconds=10.0):
    """Run `call` in a thread; if it is still running after `seconds` (blocked on the FIFO), unblock the
    FIFO by opening its write end and fail. Returns the exception `call` raised (or None)."""
    outcome = {}

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"{call} blocked for {seconds} s")
    return outcome.get("error")


# ---------------------------------------------------------------- LoRA files


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_fifo_is_refused_without_blocking(tmp_path, suffix):
    fifo = tmp_path / f"blocking{suffix}"
    os.mkfifo(fifo)
    error = finishes_quickly(lambda: read_lora_file(str(fifo)), str(fifo))
    assert isinstance(error, LoraFileError) and "not a regular file" in str(error)


def test_directories_and_devices_are_refused(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    with pytest.raises(LoraFileError, match="folder.safetensors is not a regular file"):
        read_lora_file(str(folder))
    device = tmp_path / "zero.safetensors"
    os.symlink("/dev/zero", device)  # a character device under a LoRA's name: reading would never end
    error = finishes_quickly(lambda: read_lora_file(str(device)))
    assert isinstance(error, LoraFileError) and "zero.safetensors is not a regular file" in str(error)


def test_no_pickle_fallback_for_other_extensions(tmp_path, monkeypatch):
    for name in ("weights.txt", "weights.json", "weights"):
        torch.save(lora_tensors(), tmp_path / name)  # a perfectly good pickle, under a name that is not one
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    for name in ("weights.txt", "weights.json", "weights"):
        with pytest.raises(LoraFileError, match=f"{name} is not a .safetensors"):
            read_lora_file(str(tmp_path / name))
    assert calls == []


def test_a_damaged_safetensors_file_is_not_retried_as_a_pickle(tmp_path, monkeypatch):
    fake = tmp_path / "pickled.safetensors"
    torch.save(lora_tensors(), fake)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(LoraFileError, match="pickled.safetensors could not be read"):
        read_lora_file(str(fake))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled without restrictions


def test_pickles_are_read_weights_only(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"lora_unet_a.lora_down.weight": RunsCode(str(marker))}, handle, protocol=2)
    with pytest.raises(LoraFileError, match="evil.pt could not be read"):
        read_lora_file(str(evil))
    assert not marker.exists()
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": lora_tensors()}, good)
    assert set(read_lora_file(str(good)).tensors) == set(lora_tensors())


def test_sft_is_safetensors(tmp_path):
    path = tmp_path / "style.sft"
    save_file(lora_tensors(), str(path), metadata={"ss_base_model_version": "sd_v1"})
    lora = read_lora_file(str(path))
    assert lora.metadata["ss_base_model_version"] == "sd_v1" and lora.name == "style.sft"
    assert read_header(str(path))[1]["ss_base_model_version"] == "sd_v1"


def test_a_torchscript_archive_is_not_a_lora(tmp_path):
    _, paths = tiny_encoders.build_tiny_clip(str(tmp_path))
    with pytest.raises(LoraFileError, match="tiny_clip_jit.pt is a TorchScript archive"):
        read_lora_file(paths["torchscript"])


def test_messages_name_the_file_not_its_folder(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    for call in (lambda: read_lora_file(str(corrupt), label="sub/corrupt.safetensors"),
                 lambda: read_header(str(corrupt), label="sub/corrupt.safetensors")):
        with pytest.raises(LoraFileError) as info:
            call()
        assert "sub/corrupt.safetensors" in str(info.value) and str(tmp_path) not in str(info.value)


def test_exception_types_do_not_carry_the_install_path():
    # ComfyUI reports `exception_type` as the class's __module__ + name.
    for error_class in (LoraFileError, EncoderLoadError):
        assert error_class.__module__ == "plora"
        assert issubclass(error_class, ValueError)


# ---------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety_encoders")
    clip_model, clip_paths = tiny_encoders.build_tiny_clip(str(root))
    _, dino = tiny_encoders.build_tiny_dino_v1(str(root / "dino"))
    return {"root": root, "clip": clip_model, "clip_paths": clip_paths, "dino": dino}


def test_torchscript_clip_is_read_without_torch_jit(tiny, monkeypatch):
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, tiny["clip_paths"]["torchscript"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny["clip"].encode_image(encoders.preprocess(x, 32, encoder.mean, encoder.std))
        torch.testing.assert_close(encoder.embed(x), expected, atol=1e-5, rtol=1e-5)
    tensors = read_torchscript_tensors(tiny["clip_paths"]["torchscript"])
    state = tiny["clip"].state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in state if k.startswith("visual."))


def test_a_torchscript_archive_with_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil_clip.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil_clip/data.pkl", pickle.dumps(RunsCode(str(marker)), protocol=2))
        archive.writestr("evil_clip/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil_clip/version", "3\n")
    with pytest.raises(EncoderLoadError, match="evil_clip.pt could not be read as weights"):
        load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, str(evil))
    assert not marker.exists()


def test_clip_encoder_keeps_only_the_image_tower(tiny, monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("a full CLIP model was built"))
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, tiny["clip_paths"]["safetensors"])
    visual = sum(p.numel() for p in tiny["clip"].visual.parameters())
    assert sum(p.numel() for p in encoder.model.parameters()) == visual
    assert visual < sum(p.numel() for p in tiny["clip"].parameters())
    assert not hasattr(encoder.model, "token_embedding")


def test_clip_fifo_and_unknown_extension_are_refused(tiny, tmp_path):
    fifo = tmp_path / "clip.safetensors"
    os.mkfifo(fifo)
    error = finishes_quickly(lambda: load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, str(fifo)), str(fifo))
    assert isinstance(error, EncoderLoadError) and "not a regular file" in str(error)
    text = tmp_path / "clip.npz"
    text.write_bytes(b"x")
    with pytest.raises(EncoderLoadError, match="clip.npz is not a .safetensors"):
        load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, str(text))


def test_clip_architecture_must_be_a_known_name(tiny):
    for name in ("hf-hub:timm/ViT-B-32", f"local-dir:{tiny['root']}"):
        with pytest.raises(EncoderLoadError, match="Unknown open_clip architecture"):
            load_open_clip_encoder(name, tiny["clip_paths"]["safetensors"])


def test_dino_folder_with_a_fifo_is_refused_before_anything_is_opened(tiny, tmp_path):
    import shutil

    folder = tmp_path / "dino_with_fifo"
    shutil.copytree(tiny["dino"], folder)
    os.mkfifo(folder / "pytorch_model.bin")
    error = finishes_quickly(lambda: load_dino_encoder(str(folder)), str(folder / "pytorch_model.bin"))
    assert isinstance(error, EncoderLoadError) and "pytorch_model.bin is not a regular file" in str(error)


def test_dino_folder_must_be_a_folder_and_its_index_local(tiny, tmp_path):
    import json
    import shutil

    with pytest.raises(EncoderLoadError, match="not found"):
        load_dino_encoder(str(os.path.join(tiny["dino"], "config.json")))
    folder = tmp_path / "dino_index"
    shutil.copytree(tiny["dino"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../secret.bin"}}))
    with pytest.raises(EncoderLoadError, match="names a weights file that is not in the folder"):
        load_dino_encoder(str(folder))


def test_dino_messages_use_the_label(tmp_path):
    folder = tmp_path / "no_config"
    folder.mkdir()
    with pytest.raises(EncoderLoadError) as info:
        load_dino_encoder(str(folder), label="my-dino")
    assert "my-dino" in str(info.value) and str(tmp_path) not in str(info.value)


def test_the_torchscript_reader_refuses_globals_outside_its_allowlist():
    data = pickle.dumps(RunsCode("never"), protocol=2)
    with zipfile.ZipFile(io.BytesIO(), "w") as archive:
        with pytest.raises(pickle.UnpicklingError, match="global io.open is not"):
            encoders._TensorsOnlyUnpickler(data, archive, "x").load()
