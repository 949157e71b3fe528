"""Server tier: a running ComfyUI (full checkout via COMFYUI_PATH or the install location)."""

import sys
from pathlib import Path

import pytest
from support.comfyui_checkout import find_checkout

HERE = Path(__file__).resolve().parent
CHECKOUT = find_checkout()
NO_CHECKOUT = None
if CHECKOUT is None or not (Path(CHECKOUT) / "main.py").is_file():
    NO_CHECKOUT = ("no full ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI (or install the pack in "
                   "ComfyUI/custom_nodes) to run the server and browser tiers.")

sys.path.insert(0, str(HERE))
from support import server_support  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Without a checkout every test of this tier is skipped with the reason (a module-level skip in a
    conftest would crash pytest when the tier is run on its own)."""
    if NO_CHECKOUT is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=NO_CHECKOUT))


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
