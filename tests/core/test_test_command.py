"""Neither the README's test command nor pytest installs into the Python that runs it.

Each test works in throwaway virtual environments of its own: made without system site-packages,
they see the packages of the Python running these tests through a `.pth` file, so nothing has to
be downloaded, and whatever an install step would write lands in a folder the test can inspect.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INNER_RUN = "PLORA_TEST_COMMAND_INNER_RUN"  # set for the pytest run the outer test starts: no recursion


def lending_venv(folder: Path) -> Path:
    """A venv (no pip, no system site-packages) that imports this Python's packages through a .pth; its python."""
    venv.create(folder, with_pip=False, system_site_packages=False)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    lent = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]  # also what a .pth lent us
    (site / "plora-tests-lent.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(lent)))
    return python


def site_packages_of(python: Path | str) -> list[Path]:
    out = subprocess.run([str(python), "-c", "import sysconfig; p = sysconfig.get_paths(); "
                          "print(p['purelib']); print(p['platlib'])"], capture_output=True, text=True, check=True)
    return sorted({Path(line) for line in out.stdout.split()})


def snapshot(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under the folders with its size and mtime (bytecode caches aside)."""
    files = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHON",
                                                             "PLORA_TEST_VENV")}
    env.update(extra)
    return env


def test_the_test_command_installs_into_its_own_environment_only(tmp_path):
    """The README's command run with a ComfyUI user's Python: that Python and the one running pytest stay as
    they were."""
    user_python = lending_venv(tmp_path / "comfyui-env")  # stands for the venv a ComfyUI install runs in
    tests_venv = tmp_path / "tests-venv"
    lending_venv(tests_venv)  # the test command's own environment (borrows this Python's packages)
    watched = site_packages_of(user_python) + site_packages_of(sys.executable)
    before = snapshot(watched)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), str(ROOT / "tests/core/test_lora_info.py"),
                          "-q"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=clean_env(PYTHON=str(user_python), PLORA_TEST_VENV=str(tests_venv)))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
    assert snapshot(watched) == before


def test_the_test_command_refuses_to_install_into_the_python_that_runs_it(tmp_path):
    user_env = tmp_path / "env"
    venv.create(user_env, with_pip=False)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "run_tests.sh"), "--co", "-q"], cwd=ROOT, timeout=120,
                         env=clean_env(PYTHON=str(user_env / "bin" / "python"), PLORA_TEST_VENV=str(user_env)),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Refusing to install" in run.stderr


@pytest.mark.skipif(os.environ.get(INNER_RUN) == "1", reason="the run this test starts does not start itself again")
def test_pytest_leaves_the_interpreter_that_runs_it_untouched(tmp_path):
    """`python -m pytest` on this file (whose tests run the test command) from a throwaway venv: its
    site-packages holds exactly what it held before."""
    python = lending_venv(tmp_path / "throwaway")
    folders = site_packages_of(python)
    before = snapshot(folders)
    run = subprocess.run([str(python), "-m", "pytest", str(Path(__file__)), "-q"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=clean_env(**{INNER_RUN: "1"}))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout, run.stdout[-2000:]
    assert snapshot(folders) == before
