"""The GPU check's CPU fallback: every check runs (or says why not) and passes, on the debug model."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_its_cpu_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENMAE_CACHE_DIR", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--cpu-fallback", "--no-compile", "--out", str(tmp_path / "out")]) == 0
    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| FAIL |" not in summary and summary.count("| PASS |") >= 8
    assert "fp16 needs a CUDA GPU" in summary  # a skipped check says why
