"""Names resolve only inside the model folders, as ComfyUI's loaders resolve them; nothing else is opened."""

import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from support import tiny_encoders
import torch
from support.host_support import attention_paths, load_pack, module_shapes, tiny_sd15, write_kohya_lora


@pytest.fixture(scope="module")
def place():
    """A models folder of its own (outside pytest's registered temporary root) with a file next to it."""
    root = Path(tempfile.mkdtemp(prefix="plora_models_"))
    loras = root / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "sub").mkdir()
    model = tiny_sd15()
    shapes = module_shapes(model, attention_paths(model))
    write_kohya_lora(loras / "inside.safetensors", shapes)
    write_kohya_lora(loras / "sub" / "nested.safetensors", shapes)
    write_kohya_lora(root / "models" / "secret.safetensors", shapes, seed=9)  # outside loras: never to be read
    outside = Path(tempfile.mkdtemp(prefix="plora_outside_"))
    write_kohya_lora(outside / "elsewhere.safetensors", shapes, seed=8)
    yield {"root": root, "loras": loras, "outside": outside}
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(outside, ignore_errors=True)


@pytest.fixture
def host(pack, place):
    pack.glue.host.add_model_folder("loras", str(place["loras"]))
    return pack.glue.host


def test_names_resolve_inside_the_folder(host, place):
    assert host.resolve_lora_path("inside.safetensors") == os.path.join(place["loras"], "inside.safetensors")
    assert host.resolve_lora_path(os.path.join("sub", "nested.safetensors")).endswith("nested.safetensors")
    assert "inside.safetensors" in host.lora_file_list()
    # an absolute path inside the folder is the same file as its name there
    assert host.model_name("loras", str(place["loras"] / "sub" / "nested.safetensors")) == "sub/nested.safetensors"


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../secret.safetensors",
                                  "/../secret.safetensors", "..", ".", "", "/", "sub"])
def test_names_cannot_leave_the_folder(host, place, name):
    with pytest.raises(FileNotFoundError, match=f"Model in folder 'loras' with filename '{name}' not found"):
        host.resolve_lora_path(name)


def test_absolute_paths_outside_get_the_same_error_whether_or_not_they_exist(host, place):
    errors = {}
    for name in (str(place["outside"] / "elsewhere.safetensors"), str(place["outside"] / "missing.safetensors"),
                 str(place["root"] / "models" / "secret.safetensors"), "/etc/passwd", "/etc/shadow", "/",
                 str(place["outside"]), "/dev/zero", "/proc/self/environ", "no\0byte.safetensors"):
        with pytest.raises(FileNotFoundError) as info:
            host.resolve_lora_path(name)
        errors[name] = str(info.value).replace(name, "<name>")
    assert set(errors.values()) == {"Model in folder 'loras' with filename '<name>' not found."}, errors


def test_a_fifo_or_folder_inside_the_model_folder_is_not_a_file(host, place):
    os.mkfifo(place["loras"] / "blocking.safetensors")
    (place["loras"] / "folder.safetensors").mkdir()
    try:
        for name in ("blocking.safetensors", "folder.safetensors"):
            with pytest.raises(FileNotFoundError, match=f"filename '{name}' not found"):
                host.resolve_lora_path(name)
    finally:
        os.remove(place["loras"] / "blocking.safetensors")
        os.rmdir(place["loras"] / "folder.safetensors")


def test_the_loader_node_refuses_outside_files_before_reading_them(pack, host, place, monkeypatch):
    import plora_pack.plora_core.lora_file as lora_file

    reads = []
    original = lora_file.read_lora_file
    monkeypatch.setattr(pack.glue.lora_loading, "read_lora_file", lambda *a, **k: reads.append(a) or original(*a, **k))
    loader = pack.nodes.LoadSubjectStyleLoRA()
    for name in (str(place["outside"] / "elsewhere.safetensors"), "../secret.safetensors"):
        with pytest.raises(FileNotFoundError, match="Model in folder 'loras'"):
            loader.load(name, 1.0, "inside.safetensors", 1.0)
    assert reads == []
    pair, _ = loader.load("inside.safetensors", 1.0, str(place["loras"] / "sub" / "nested.safetensors"), 1.0)
    assert (pair.subject.name, pair.style.name) == ("inside.safetensors", "sub/nested.safetensors")
    assert reads and all(str(place["loras"]) in a[0] for a in reads)


def test_a_fifo_given_to_the_loader_does_not_block_it(pack, host, place):
    fifo = place["outside"] / "blocking.safetensors"
    os.mkfifo(fifo)
    inside = place["loras"] / "inside_fifo.safetensors"
    os.mkfifo(inside)
    outcome = []

    def run():
        for name in (str(fifo), "inside_fifo.safetensors"):
            try:
                pack.nodes.LoadSubjectStyleLoRA().load(name, 1.0, "inside.safetensors", 1.0)
            except FileNotFoundError as error:
                outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "the loader blocked on a FIFO"
        assert len(outcome) == 2
    finally:
        for path in (fifo, inside):
            if thread.is_alive():
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            os.remove(path)


@pytest.fixture(scope="module")
def encoder_folders():
    """open_clip and dino folders of their own, and a second copy of each outside them."""
    root = Path(tempfile.mkdtemp(prefix="plora_encoder_models_"))
    for sub in ("open_clip", "dino/tiny_dino", "outside/dino"):
        (root / sub).mkdir(parents=True)
    _, paths = tiny_encoders.build_tiny_clip(str(root / "open_clip"))
    shutil.copy(paths["safetensors"], root / "outside" / "clip.safetensors")
    tiny_encoders.build_tiny_dino_v1(str(root / "dino" / "tiny_dino"))
    tiny_encoders.build_tiny_dino_v1(str(root / "outside" / "dino"))
    host = load_pack().glue.host
    host.add_model_folder("open_clip", str(root / "open_clip"))
    host.add_model_folder("dino", str(root / "dino"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_encoder_loaders_read_only_inside_their_folders(pack, encoder_folders):
    nodes = pack.nodes.encoder_nodes
    clip = nodes.LoadPLoRACLIPEncoder().load("tiny_clip.safetensors", tiny_encoders.TINY_CLIP_ARCH, "fp32")[0]
    dino = nodes.LoadPLoRADINOEncoder().load("tiny_dino", "fp32")[0]
    assert clip.embed(torch.rand(1, 3, 32, 32)).shape == (1, 16) and "tiny_dino" in dino.name
    assert "tiny_dino" in pack.glue.host.model_dir_list("dino")
    with pytest.raises(FileNotFoundError, match="Model in folder 'open_clip'"):
        nodes.LoadPLoRACLIPEncoder().load(str(encoder_folders / "outside" / "clip.safetensors"),
                                          tiny_encoders.TINY_CLIP_ARCH, "fp32")
    for name in (str(encoder_folders / "outside" / "dino"), "../outside/dino", ".", "tiny_dino/config.json"):
        with pytest.raises(FileNotFoundError, match="Model in folder 'dino'"):
            nodes.LoadPLoRADINOEncoder().load(name, "fp32")


def test_encoder_messages_name_the_entry_not_the_server_path(pack, encoder_folders):
    with pytest.raises(ValueError) as info:
        pack.nodes.encoder_nodes.LoadPLoRACLIPEncoder().load("tiny_clip.safetensors", "ViT-B-32", "fp32")
    assert "tiny_clip.safetensors" in str(info.value) and str(encoder_folders) not in str(info.value)


def test_only_open_clip_configs_in_the_folder_become_architectures(pack, encoder_folders):
    import json

    import open_clip

    folder = encoder_folders / "open_clip"
    (folder / "broken.json").write_bytes(b"\x80\x04\x95 not json")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    config = dict(tiny_encoders.TINY_CLIP_CONFIG)
    (folder / "PLoRA-Custom-ViT.json").write_text(json.dumps(config))
    node = pack.nodes.encoder_nodes.LoadPLoRACLIPEncoder
    architectures = node.INPUT_TYPES()["required"]["architecture"][0]  # must not raise
    assert "PLoRA-Custom-ViT" in architectures and "broken" not in open_clip.list_models()
    assert "config" not in open_clip.list_models()
    tiny_encoders.register_tiny_clip_arch(str(folder))  # open_clip rescans every config: all still readable
