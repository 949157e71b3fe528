"""Host tier: needs a ComfyUI checkout (v0.3.64 or newer): COMFYUI_PATH, or the pack in ComfyUI/custom_nodes."""

import pytest
from support.comfyui_checkout import find_checkout

if find_checkout() is None:
    pytest.skip(
        "no ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI (v0.3.64 or newer), or install the pack in "
        "ComfyUI/custom_nodes, to run the host tier.",
        allow_module_level=True,
    )

from support import host_support  # noqa: E402  (sets comfy to CPU before anything imports model_management)

host_support.ensure_cpu()
host_support.load_pack()  # importable as plora_pack from here on, as ComfyUI imports custom_nodes/<pack>


@pytest.fixture(scope="session", autouse=True)
def _temporary_model_folders(tmp_path_factory):
    """Files the tests write under pytest's temporary root are inside a registered model folder."""
    host_support.register_test_model_folders(tmp_path_factory.getbasetemp())


@pytest.fixture
def pack():
    return host_support.load_pack()


@pytest.fixture
def tiny_sd15():
    return host_support.tiny_sd15


@pytest.fixture(autouse=True)
def _unload_models():
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()


@pytest.fixture(scope="session")
def encoder_files(tmp_path_factory):
    """(CLIP checkpoint, DINO folder): tiny random encoders saved in their real formats."""
    from support import tiny_encoders

    folder = tmp_path_factory.mktemp("encoders")
    (folder / "clip").mkdir()
    (folder / "dino").mkdir()
    _, paths = tiny_encoders.build_tiny_clip(str(folder / "clip"))
    tiny_encoders.build_tiny_dino_v1(str(folder / "dino"))
    return paths["safetensors"], str(folder / "dino")


@pytest.fixture(scope="session")
def encoders(encoder_files):
    """(CLIP, DINO): the tiny encoders loaded by the pack's loaders."""
    from support import tiny_encoders
    from plora_pack.plora_core.encoders import load_dino_encoder, load_open_clip_encoder

    clip_file, dino_folder = encoder_files
    return load_open_clip_encoder(tiny_encoders.TINY_CLIP_ARCH, clip_file), load_dino_encoder(dino_folder)
