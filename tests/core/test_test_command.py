"""The README's test command never installs into the Python that runs it (issue: it used to put
the 2024 `comfy` core into a ComfyUI environment, shadowing the checkout's own packages)."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="reuses the tests' own virtual environment, and these "
                    "tests are not running in one (run them with scripts/run_tests.sh)")
def test_the_test_command_leaves_a_comfyui_environment_untouched(tmp_path):
    checkout = tmp_path / "ComfyUI"
    for package in ("comfy", "comfy_execution", "comfy_extras"):  # namespace folders, as in ComfyUI v0.3.x
        (checkout / package).mkdir(parents=True)
        (checkout / package / "marker.py").write_text("CHECKOUT = True\n")
    user_env = tmp_path / "comfyui-env"
    venv.create(user_env, with_pip=False)  # no pip: an install attempt into it fails loudly
    user_python = user_env / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(user_python), PLORA_TEST_VENV=sys.prefix)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), str(ROOT / "tests/core/test_lora_info.py"),
                          "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
    probe = subprocess.run([str(user_python), "-c", "import comfy.marker, comfy_extras.marker; print(comfy.__path__)"],
                           cwd=checkout, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert str(checkout / "comfy") in probe.stdout
    listed = subprocess.run([str(user_python), "-c", "import json, sys; print(json.dumps(sys.path))"],
                            capture_output=True, text=True)
    site = [p for p in json.loads(listed.stdout) if p.endswith("site-packages")]
    assert site and not any((Path(p) / "comfy").exists() for p in site)


def test_the_test_command_refuses_to_install_into_the_python_that_runs_it(tmp_path):
    user_env = tmp_path / "env"
    venv.create(user_env, with_pip=False)
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env.update(PYTHON=str(user_env / "bin" / "python"), PLORA_TEST_VENV=str(user_env))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), "--co", "-q"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Refusing to install" in run.stderr
