"""The measuring-cost benchmark runs on the debug model and reports every shape it measured."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_measuring.py"


def test_the_measuring_benchmark_reports_each_shape_measured(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_measuring", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--model", "mae_vit_debug", "--batch", "2", "--precision", "bf16", "--steps", "2"]
    assert bench.main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "measuring_cost_mae_vit_debug_bf16.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| attention:", "| bf16 gemm:"))]
    assert any(r.startswith("| attention:") for r in rows) and any(r.startswith("| bf16 gemm:") for r in rows)
    assert all("native" in r or "sdpa" in r for r in rows)  # every candidate's time is listed
    assert "First step" in table and "shapes measured" in table
