"""The module caches: bounded in bytes (not entries), emptied on request, encoders moved off the device."""

import pytest
from support import tiny_encoders
import torch
from safetensors.torch import save_file

from plora_pack.plora_core import encoders
from plora_pack.plora_core.encoders import ENCODER_CACHE, ImageEncoder, load_open_clip_encoder, release_encoders
from plora_pack.plora_core.lora_file import LORA_CACHE, clear_lora_cache, read_lora_file
from plora_pack.plora_core.sized_cache import SizedCache


@pytest.fixture(autouse=True)
def restore_limits():
    limits = LORA_CACHE.limit, ENCODER_CACHE.limit
    clear_lora_cache()
    encoders.clear_encoder_cache()
    yield
    LORA_CACHE.set_limit(limits[0])
    ENCODER_CACHE.set_limit(limits[1])
    clear_lora_cache()
    encoders.clear_encoder_cache()


def test_sized_cache_evicts_least_recently_used_by_bytes():
    cache = SizedCache(100, len)
    cache.put(("a",), b"x" * 40)
    cache.put(("b",), b"x" * 40)
    assert cache.get(("a",)) is not None  # a is now the most recently used
    cache.put(("c",), b"x" * 40)  # 120 bytes > 100: the oldest, b, goes
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None and cache.get(("c",)) is not None
    assert cache.info() == {"entries": 2, "bytes": 80, "limit_bytes": 100}
    big = b"x" * 101
    assert cache.put(("big",), big) is big  # handed back, not kept
    assert cache.get(("big",)) is None and cache.nbytes == 80
    cache.set_limit(50)
    assert cache.info()["entries"] == 1 and cache.nbytes == 40
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def write_lora(path, width):
    tensors = {"lora_unet_a.lora_down.weight": torch.zeros(4, width),
               "lora_unet_a.lora_up.weight": torch.zeros(width, 4)}
    save_file(tensors, str(path))
    return sum(t.nbytes for t in tensors.values())


def test_lora_cache_is_bounded_in_bytes_not_files(tmp_path):
    small = [write_lora(tmp_path / f"small{i}.safetensors", 16) for i in range(6)]
    large = write_lora(tmp_path / "large.safetensors", 4096)
    LORA_CACHE.set_limit(large + small[0])
    for i in range(6):  # six small files fit (the old cache kept four files, whatever their size)
        read_lora_file(str(tmp_path / f"small{i}.safetensors"))
    assert LORA_CACHE.info()["entries"] == 6 and LORA_CACHE.nbytes == sum(small)
    first = read_lora_file(str(tmp_path / "large.safetensors"))
    assert LORA_CACHE.nbytes <= LORA_CACHE.limit
    assert read_lora_file(str(tmp_path / "large.safetensors")) is first
    assert LORA_CACHE.info()["entries"] < 7
    clear_lora_cache()
    assert LORA_CACHE.info() == {"entries": 0, "bytes": 0, "limit_bytes": LORA_CACHE.limit}
    assert read_lora_file(str(tmp_path / "large.safetensors")) is not first  # read anew after a release


def test_encoder_cache_counts_weight_bytes_and_release_empties_it(tmp_path):
    _, paths = tiny_encoders.build_tiny_clip(str(tmp_path))
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"])
    weights = sum(t.nbytes for t in (*encoder.model.parameters(), *encoder.model.buffers()))
    assert ENCODER_CACHE.info() == {"entries": 1, "bytes": weights, "limit_bytes": ENCODER_CACHE.limit}
    ENCODER_CACHE.set_limit(weights - 1)  # too large to keep now
    assert ENCODER_CACHE.info()["entries"] == 0
    assert load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"]) is not encoder
    ENCODER_CACHE.set_limit(weights)
    load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"], dtype=torch.float64)
    assert ENCODER_CACHE.info()["entries"] == 0, "float64 is twice the bytes: over the limit"
    ENCODER_CACHE.set_limit(10 * weights)
    cached = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"])
    release_encoders()
    assert ENCODER_CACHE.info()["entries"] == 0
    assert load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"]) is not cached


class Recording(ImageEncoder):
    """An encoder on a (pretend) accelerator that records where its model is moved."""

    def __init__(self):
        super().__init__(name="recording", image_size=4, mean=(0, 0, 0), std=(1, 1, 1), device="cpu")
        self.device = torch.device("cuda", 0)  # where it would run; nothing is really moved here
        self.model = torch.nn.Identity()
        self.moves = []

    def _move(self, device):
        self.moves.append(str(device))
        self.offloaded = device != self.device

    def embed(self, images):
        if self.offloaded:
            self._move(self.device)
        return images


def test_release_moves_live_encoders_off_the_accelerator_and_use_brings_them_back():
    encoder = Recording()
    release_encoders()
    assert encoder.moves == ["cpu"] and encoder.offloaded
    release_encoders()
    assert encoder.moves == ["cpu"], "already off the device"
    encoder.embed(torch.zeros(1, 3, 4, 4))
    assert encoder.moves == ["cpu", "cuda:0"] and not encoder.offloaded


def test_offload_and_reload_keep_the_embeddings(tmp_path):
    _, paths = tiny_encoders.build_tiny_clip(str(tmp_path))
    encoder = load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, paths["safetensors"])
    encoder.device = torch.device("meta")  # pretend it runs elsewhere: offload then really moves it to the CPU
    encoder.offload()
    assert encoder.offloaded and next(encoder.model.parameters()).device.type == "cpu"
    encoder.device = torch.device("cpu")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        first = encoder.embed(x)
    assert not encoder.offloaded
    with torch.inference_mode():
        encoder.offloaded = True
        encoder.embed(x)  # moved back inside inference mode: its weights stay normal tensors
    assert not any(p.is_inference() for p in encoder.model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(x), first)
