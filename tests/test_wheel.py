"""`pip install .` (not editable) gives a working `larpo`: the wheel holds every package of ours and
the files they read at run time (the bundled configs and the prompts they name), and an installed
command finds them without a checkout (core/project_files.py).

The wheel is built from a copy of the checkout and installed, without its dependencies, into a
fresh venv that borrows this venv's installed packages through a .pth line (no download, and not
this venv's editable install of the checkout): nothing of the checkout is importable there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("core", "pipeline", "pools", "rewards", "stages")
# What a copy of the checkout leaves out: caches, runs, builds and the venv itself.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".whl", ".gl")


def checkout_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def run(command, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, env, cwd): the wheel installed into a fresh venv, with an environment and a working
    directory outside the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCE)
    dist = root / "dist"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, source], cwd=root, env=env)
    wheel, = dist.glob("larpo_pipeline-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=root, env=env).stdout.strip())
    # A bare path line: this venv's packages become importable, but its .pth files (the editable
    # install's finder, which maps our packages to the checkout) are not run.
    (purelib / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip (borrowed too) installs into the interpreter that runs it: the new venv.
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
        cwd=root, env=env)
    cwd = root / "elsewhere"
    cwd.mkdir()
    env["HOME"] = str(root / "home")
    env.pop("XDG_CACHE_HOME", None)
    env.pop("LARPO_CACHE", None)
    return venv, env, cwd


def test_the_wheel_holds_the_files_the_code_reads(installed):
    venv, _, _ = installed
    wheel, = (venv.parent / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {path.relative_to(REPO_ROOT).as_posix() for package in PACKAGES
              for path in (REPO_ROOT / package).rglob("*.py")}
    bundled = [path.relative_to(REPO_ROOT).as_posix()
               for pattern in ("configs/*.yaml", "configs/paper/*.yaml", "data/prompts/*.jsonl")
               for path in REPO_ROOT.glob(pattern)]
    assert "configs/smoke.yaml" in bundled and "data/prompts/smoke_train.jsonl" in bundled
    wanted |= {f"core/_project/{name}" for name in bundled}
    # Read beside their package's modules: the LLM judge's default templates.
    templates = {path.relative_to(REPO_ROOT).as_posix()
                 for path in (REPO_ROOT / "rewards").glob("judge_templates/*.txt")}
    assert {"rewards/judge_templates/pointwise.txt", "rewards/judge_templates/listwise.txt"} <= templates
    wanted |= templates
    assert sorted(wanted - names) == []


def test_every_module_imports_from_the_installed_wheel(installed):
    venv, env, cwd = installed
    code = ("import importlib, json, sys\n"
            "files = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}\n"
            "print(json.dumps({'path': sys.path, 'files': files}))\n")
    result = run([venv / "bin" / "python", "-c", code, *checkout_modules()], cwd=cwd, env=env, timeout=600)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # -c puts the current directory first ("" in sys.path): here it is not the checkout.
    assert REPO_ROOT.resolve() not in {Path(entry or cwd).resolve() for entry in found["path"]}
    outside = {name: file for name, file in found["files"].items() if not Path(file).is_relative_to(venv)}
    assert outside == {}
    assert set(found["files"]) == set(checkout_modules())


def test_the_installed_command_finds_its_bundled_files(installed):
    venv, env, cwd = installed
    larpo = venv / "bin" / "larpo"
    assert run([larpo, "--version"], cwd=cwd, env=env).stdout.strip() == "larpo 0.1.0"
    keys = run([larpo, "config"], cwd=cwd, env=env).stdout
    assert "model.name = embedded:smollm2-135m-instruct" in keys and "train.beta = " in keys

    code = ("from core.config import BUNDLED_CONFIGS, DEFAULT_CONFIG; from core.project_files import CHECKOUT; "
            "from pipeline.driver import ray_worker_env; "
            "print(BUNDLED_CONFIGS); print(DEFAULT_CONFIG.is_file()); print(CHECKOUT); "
            "print(ray_worker_env().get('PYTHONPATH'))")
    bundled, default_exists, checkout, worker_path = run([venv / "bin" / "python", "-c", code], cwd=cwd,
                                                         env=env).stdout.splitlines()
    bundled = Path(bundled)
    assert bundled.is_relative_to(venv) and default_exists == "True" and checkout == "None"
    # The Ray workers import the installed packages: no checkout on their PYTHONPATH.
    assert worker_path == "None"
    smoke = bundled / "smoke.yaml"

    # The default config's prompts are the wheel's; its runs go under the current directory.
    resolved = run([larpo, "config", "--config", bundled / "default.yaml"], cwd=cwd, env=env).stdout
    assert f"output: {cwd / 'runs'}" in resolved
    assert f"train: {bundled.parent / 'data' / 'prompts' / 'train_multi.jsonl'}" in resolved

    # Without a prepared model cache: one line saying what to do.
    missing = subprocess.run([larpo, "round", "1", "--dry-run", "--config", smoke], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
    cache = Path(env["HOME"]) / ".cache" / "larpo" / "models" / "tiny-random-llama"
    assert missing.returncode != 0
    assert missing.stderr.strip() == (f"error: embedded model 'embedded:tiny-random-llama' is not prepared at "
                                      f"{cache}; run `larpo prepare-models` or set LARPO_CACHE")

    # With the checkout's prepared models (`make setup`) as the cache, the dry run plans the round.
    if not (REPO_ROOT / ".cache" / "models" / "tiny-random-llama" / "config.json").is_file():
        pytest.fail("the tiny model is missing: run `make setup` before the tests")
    env = {**env, "LARPO_CACHE": str(REPO_ROOT / ".cache")}
    plan = run([larpo, "round", "1", "--dry-run", "--config", smoke, "--run", "wheel"], cwd=cwd, env=env).stdout
    assert f"dry run: nothing is written. Run {cwd / 'runs' / 'wheel'}" in plan
    assert f"prompts    12 from {bundled.parent / 'data' / 'prompts' / 'smoke_train.jsonl'}" in plan
    assert not (cwd / "runs").exists() and sorted(cwd.iterdir()) == []
