"""The step-memory benchmark runs engines in fresh processes and reports where each one peaks."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_memory.py"


def test_the_memory_benchmark_reports_each_engine(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    engines = ["openmae@allocator=system", "openmae@allocator=system,norm=recompute"]
    argv = ["--model", "mae_vit_debug", "--batch", "2", "--processes", "1", "--steps", "1", "--threads", "1"]
    assert bench.main([*argv, "--engines", *engines, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "memory_mae_vit_debug_fp32.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `openmae")]
    assert len(rows) == 2
    for row in rows:
        rss, live, at, step = (float(cell) for cell in row.split("|")[2:6])
        assert rss > 50 and live > 0 and 0 <= at <= 1 and step > 0
