"""The registry package: the files `comfy node pack` / `comfy node publish` put in the zip, and
`comfy node validate`.

comfy-cli (1.23, comfy_cli/file_utils.py `zip_files`) zips the output of `git ls-files` run in the
repository root (files that no longer exist are left out), minus the paths the `.comfyignore`
patterns match: each line stripped, blank lines and `#` lines dropped, the rest read by pathspec as
"gitwildmatch" (gitignore) patterns; `[tool.comfy] includes` override `.comfyignore`. Without git
it zips the whole tree minus the same patterns, pruning ignored folders. `registry_files` rebuilds
that list; when comfy-cli is installed its own `zip_files` is run as well and must agree.
"""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pathspec = pytest.importorskip("pathspec", reason="`pip install pathspec` (comfy-cli's pattern matcher)")
# pathspec 1.x deprecates the pattern name comfy-cli uses ("gitwildmatch"); same matching either way
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")

# What only developers use; none of it may ship.
DEVELOPER_ONLY = ("tests/", "benchmarks/", "scripts/", ".ci/", ".github/", "requirements-test.txt")
# What ComfyUI, the Manager and the registry read besides the Python modules.
PACKAGE_METADATA = ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE")


def comfyignore_spec(root: Path):
    lines = [line.strip() for line in (root / ".comfyignore").read_text(encoding="utf-8").splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    return pathspec.PathSpec.from_lines("gitwildmatch", patterns)


def tracked_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line for line in out.splitlines() if line.strip()]


def registry_files(root: Path = ROOT, use_git: bool = True) -> set[str]:
    """The relative paths comfy-cli's zip_files puts in the registry zip of `root`."""
    spec = comfyignore_spec(root)
    includes = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    prefixes = [os.path.normpath(i.lstrip("/")).replace("\\", "/") for i in includes]

    def ignored(path: str) -> bool:
        if any(path == p or path.startswith(p + "/") for p in prefixes):
            return False
        return spec.match_file(path)

    files = set()
    tracked = tracked_files(root) if use_git else None
    if tracked:
        files = {path for path in tracked if (root / path).exists() and not ignored(path)}
    else:
        for folder, dirs, names in os.walk(root):
            relative = Path(folder).relative_to(root)
            if ".git" in dirs:
                dirs.remove(".git")
            dirs[:] = [d for d in dirs if not ignored((relative / d).as_posix())]
            files |= {(relative / n).as_posix() for n in names if not ignored((relative / n).as_posix())}
    for include in prefixes:
        for folder, _, names in os.walk(root / include):
            files |= {(Path(folder) / n).relative_to(root).as_posix() for n in names}
    return files


def imported_pack_files(root: Path = ROOT) -> dict[str, str]:
    """{file: importing file} for every module the pack's __init__.py reaches through imports of its own
    modules (relative imports, and absolute ones naming a top-level folder of the repo), transitively."""
    top_level = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}

    def module_file(parts: list[str]) -> Path | None:
        base = root.joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    found, todo = {"__init__.py": "ComfyUI"}, [root / "__init__.py"]
    while todo:
        path = todo.pop()
        package = list(path.relative_to(root).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                module = base + (node.module.split(".") if node.module else [])
                targets = [module] + [module + [alias.name] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in top_level:
                targets = [node.module.split(".")]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] in top_level]
            for target in targets:
                file = module_file(target)
                if file is not None and file.relative_to(root).as_posix() not in found:
                    found[file.relative_to(root).as_posix()] = path.relative_to(root).as_posix()
                    todo.append(file)
    return found


def served_files(root: Path = ROOT) -> set[str]:
    """What ComfyUI serves from the pack: WEB_DIRECTORY (the frontend extension and help pages) and the
    workflows folder with the thumbnails its template browser loads (<name>.jpg)."""
    web = {p.relative_to(root).as_posix() for p in (root / "web").rglob("*") if p.is_file()}
    workflows = {p.relative_to(root).as_posix() for p in (root / "workflows").glob("*.json")}
    thumbnails = {w.removesuffix(".json") + ".jpg" for w in workflows}
    return web | workflows | thumbnails


def developer_only(path: str) -> bool:
    return path.startswith(DEVELOPER_ONLY) or path in DEVELOPER_ONLY


def test_the_registry_zip_holds_no_tests_benchmarks_scripts_or_ci():
    if tracked_files(ROOT) is None:
        pytest.skip("not a git checkout: the git-tracked list comfy-cli zips cannot be built")
    shipped = registry_files()
    assert [p for p in sorted(shipped) if developer_only(p)] == []
    assert [p for p in sorted(shipped) if p.endswith((".sh", ".ipynb")) or "__pycache__" in p] == []


def test_the_registry_zip_holds_everything_the_pack_loads():
    if tracked_files(ROOT) is None:
        pytest.skip("not a git checkout: the git-tracked list comfy-cli zips cannot be built")
    shipped = registry_files()
    imported = imported_pack_files()
    walked = {"nodes/__init__.py", "glue/host.py", "plora_core/lora_file.py", "plora_core/files.py"}
    assert walked <= set(imported)  # the walk works
    missing = {path: by for path, by in imported.items() if path not in shipped}
    assert missing == {}, ("imported at run time but not in the registry zip (untracked, or matched by "
                           f".comfyignore; `git add` it): {missing}")
    needed = served_files() | set(PACKAGE_METADATA)
    assert sorted(needed - shipped) == [], "served or read by ComfyUI but not in the registry zip (`git add` it)"


def test_a_zip_built_without_git_is_as_clean(tmp_path):
    """Outside a git checkout comfy-cli zips the whole tree: .comfyignore alone keeps the venv, caches and
    the developer files out."""
    shipped = registry_files(use_git=False)
    assert [p for p in sorted(shipped) if developer_only(p)] == []
    assert [p for p in sorted(shipped) if p.split("/")[0] in (".venv", ".git", ".ruff_cache", ".pytest_cache")
            or "__pycache__" in p or p.endswith(".pyc")] == []
    assert set(imported_pack_files()) | served_files() | set(PACKAGE_METADATA) <= shipped


def import_comfy_cli(module: str, home: Path, monkeypatch):
    """A comfy-cli module, imported with HOME in the test's folder (it makes ~/.config/comfy-cli on import)."""
    monkeypatch.setenv("HOME", str(home))
    return pytest.importorskip(module, reason="comfy-cli is not installed (scripts/run_tests.sh installs it from "
                               "requirements-test.txt)")


def test_comfy_clis_own_zip_matches(tmp_path, monkeypatch):
    file_utils = import_comfy_cli("comfy_cli.file_utils", tmp_path, monkeypatch)
    if tracked_files(ROOT) is None:
        pytest.skip("not a git checkout")
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"].get("includes", [])
    monkeypatch.chdir(ROOT)  # comfy-cli zips the current folder
    file_utils.zip_files(tmp_path / "node.zip", includes)
    with zipfile.ZipFile(tmp_path / "node.zip") as archive:
        assert set(archive.namelist()) == registry_files()


def copy_tracked_tree(destination: Path) -> None:
    """The working tree as a commit of it would hold it: tracked and untracked files, .gitignore'd ones left out."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    for relative in listing:
        source = ROOT / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


def comfy_cli_command() -> list[str] | None:
    script = Path(sys.executable).with_name("comfy")
    if script.is_file():
        return [str(script)]
    found = shutil.which("comfy")
    return [found] if found else None


def test_comfy_node_validate_passes(tmp_path):
    command = comfy_cli_command()
    if command is None:
        pytest.skip("comfy-cli is not installed (`pip install comfy-cli`; scripts/run_tests.sh installs it)")
    if tracked_files(ROOT) is None:
        pytest.skip("not a git checkout")
    tree = tmp_path / "pack"
    copy_tracked_tree(tree)
    home = tmp_path / "home"  # comfy-cli keeps its config in ~/.config/comfy-cli
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1", "NO_COLOR": "1"}
    result = subprocess.run([*command, "--skip-prompt", "--no-json", "node", "validate"], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert "Warning" not in output and "Security warnings" not in output, output


def test_comfy_cli_reads_the_registry_fields(tmp_path, monkeypatch):
    """requires-comfyui and the classifiers are read where comfy-cli looks for them (a wrong key or format
    is dropped, at most with a warning)."""
    config_parser = import_comfy_cli("comfy_cli.registry.config_parser", tmp_path, monkeypatch)
    config = config_parser.extract_node_configuration(str(ROOT / "pyproject.toml"))
    assert config.project.supported_comfyui_version.startswith(">=0.3.")
    assert config.project.supported_os == ["OS Independent"]
    assert "GPU :: NVIDIA CUDA" in config.project.supported_accelerators
    assert config.project.license.file == "LICENSE" and config.tool_comfy.publisher_id
    assert config.project.dependencies == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
