"""bench/gpu_check.py (`make gpu-check`) at its CPU sizes: every part runs and passes, without Ray or vLLM."""

import json
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
PARTS = ("logprob_parity", "train_step", "fsdp", "reward_invariance", "trl_dpo")


def test_quick_check_passes_on_cpu_without_ray_or_vllm(tmp_path):
    out = tmp_path / "gpu-check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["passed"] is True and results["device"] == "cpu" and results["quick"] is True
    for part in PARTS:
        assert results["parts"][part]["status"] == "passed", (part, results["parts"][part].get("reason"))
        assert results["parts"][part]["seconds"] >= 0
        assert f"PASSED  {part}" in run.stdout
    # The device machine has neither: nothing the check runs may import them.
    assert results["imports"] == {"ray": False, "vllm": False, "modules": []}
    assert "total " in run.stdout

    parity = results["parts"]["logprob_parity"]
    from tests.tiny_families import FAMILIES

    assert set(parity["families"]) == set(FAMILIES)
    assert parity["tolerance_nats_per_token"] == {"fp32": 1e-3, "bf16": 0.25}  # pools/logprob_scorer.py's
    assert parity["worst"]["fp32_vs_model_own"] <= 1e-3
    assert parity["worst"]["bf16_autocast_vs_fp32"] <= 0.25
    train = results["parts"]["train_step"]
    assert train["tokens_per_second"] > 0 and train["mfu"] is None  # no MFU without a known GPU peak
    fsdp = results["parts"]["fsdp"]
    assert fsdp["backend"] == "gloo" and set(fsdp["variants"]) == {"fp32_params", "bf16_params_fp32_reduce"}
    assert set(results["parts"]["reward_invariance"]["dtypes"]) == {"float32", "bfloat16"}
    trl = results["parts"]["trl_dpo"]
    assert trl["trl"].startswith("installed") and trl["loss_diff"] <= 1e-5 and not trl["grad_params_missing"]


def test_runs_where_ray_and_vllm_are_not_installed(tmp_path):
    # As on the device machine: importing either fails, and find_spec answers None.
    out = tmp_path / "gpu-check.json"
    code = ("import runpy, sys; sys.modules['ray'] = sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out),
                          "--parts", "fsdp,reward_invariance,trl_dpo"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [part["status"] for part in results["parts"].values()] == ["passed"] * 3


def fake_wheel(folder, name: str, init: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("trl/__init__.py", init)
    return path


def import_trl_without_site(wheel, scratch) -> list:
    """gpu_check.import_trl in an interpreter without site-packages (python -S), where trl is missing."""
    code = ("import json, sys; from pathlib import Path; sys.path[:0] = [sys.argv[1]]; import gpu_check; "
            "trl, how = gpu_check.import_trl(sys.argv[2] or None, Path(sys.argv[3])); "
            "print(json.dumps([getattr(trl, '__version__', None), getattr(trl, '__file__', None), how]))")
    run = subprocess.run([sys.executable, "-S", "-c", code, str(REPO_ROOT / "bench"), str(wheel or ""), str(scratch)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


TRL_STUB = "__version__ = '0.0.test'\nclass DPOConfig: pass\nclass DPOTrainer: pass\n"


@pytest.mark.parametrize("name", ["trl-0.0.0-py3-none-any.whl", "trl-0.0.0-cp311-cp311-linux_x86_64.whl"])
def test_trl_imports_from_a_carried_wheel(tmp_path, name):
    wheel = fake_wheel(tmp_path / "wheels", name, TRL_STUB)
    version, where, how = import_trl_without_site(tmp_path / "wheels", tmp_path / "scratch")
    assert version == "0.0.test" and how.startswith(f"from wheel(s) {name}")
    if name.endswith("-any.whl"):
        assert where.startswith(str(wheel))  # imported from the zip itself
    else:
        assert where.startswith(str(tmp_path / "scratch" / "wheels"))  # a platform wheel is unpacked first


def test_trl_missing_is_reported_not_passed(tmp_path):
    version, _, how = import_trl_without_site(None, tmp_path)
    assert version is None and "trl is not installed" in how and "--trl-wheel" in how
    wheel = fake_wheel(tmp_path / "broken", "trl-0.0.1-py3-none-any.whl", "import datasets_not_here\n")
    version, _, how = import_trl_without_site(wheel, tmp_path)
    assert version is None and "does not import here" in how and "datasets_not_here" in how
