"""The step-memory benchmark runs engines in fresh processes and reports where each one peaks."""

import importlib.util
from pathlib import Path

from openmae.accel.attention import KERNELS

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_memory.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_memory_benchmark_reports_each_engine(tmp_path):
    bench = load_script()
    engines = ["openmae@allocator=system", "openmae@allocator=system,norm=recompute"]
    argv = ["--model", "mae_vit_debug", "--batch", "2", "--processes", "1", "--steps", "1", "--threads", "1"]
    assert bench.main([*argv, "--engines", *engines, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "memory_mae_vit_debug_fp32.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `openmae")]
    assert len(rows) == 2
    for row in rows:
        rss, live, at, step = (float(cell) for cell in row.split("|")[2:6])
        assert rss > 50 and live > 0 and 0 <= at <= 1 and step > 0
        chosen = row.split("|")[6].split(";")  # the encoder's and the decoder's attention
        assert len(chosen) == 2 and all(entry.split("] ")[1].strip() in KERNELS for entry in chosen)


def test_the_memory_benchmark_names_the_attention_kernels_the_tuner_chose():
    bench = load_script()
    paths = {
        "attention:cpu float32 [8, 50, 3, 12, 64] fwd+bwd": "per_head",
        "bf16 gemm:linear ((8, 50, 768), True)": "fp32",
        "attention:cpu float32 [8, 197, 3, 16, 32] fwd+bwd": "sdpa (sdpa 23.7 ms, per_head 24.3 ms)",
    }
    assert bench.attention_choices(paths) == "[8, 50, 3, 12, 64] per_head; [8, 197, 3, 16, 32] sdpa"
    assert bench.attention_choices({"cpu allocator": "system"}) == "-"


def test_the_memory_table_shows_each_process_choice_where_they_differ():
    bench = load_script()
    run = {"peak_rss_mb": 3000.0, "live_peak_mb": 500.0, "live_peak_at": 0.3, "step_s": 5.0}
    same = [{**run, "attention": "[8, 197, 3, 16, 32] sdpa"}] * 2
    differ = [same[0], {**run, "attention": "[8, 197, 3, 16, 32] per_head"}]
    table = bench.report("--config base", "base", 8, "fp32", {"same": same, "differ": differ})
    rows = {line.split("`")[1]: line.split("|")[6].strip() for line in table.splitlines() if "| `" in line}
    assert rows == {
        "same": "[8, 197, 3, 16, 32] sdpa",
        "differ": "[8, 197, 3, 16, 32] sdpa / [8, 197, 3, 16, 32] per_head",
    }
