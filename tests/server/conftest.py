"""Server tier: a running ComfyUI (full checkout via COMFYUI_PATH or the install location)."""

import sys
from pathlib import Path

import pytest
from comfyui_checkout import find_checkout

CHECKOUT = find_checkout()
if CHECKOUT is None or not (Path(CHECKOUT) / "main.py").is_file():
    pytest.skip("no full ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI (or install the pack in "
                "ComfyUI/custom_nodes) to run the server and browser tiers.", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import server_support  # noqa: E402


@pytest.fixture(scope="session")
def base_directory(tmp_path_factory):
    return server_support.build_base_directory(tmp_path_factory.mktemp("comfyui_base"))


@pytest.fixture(scope="session")
def server(base_directory):
    with server_support.running_server(CHECKOUT, base_directory) as running:
        yield running


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")
