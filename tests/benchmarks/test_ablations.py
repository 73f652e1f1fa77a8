"""The ablations' results file: a piece rewrites its own studies' sections and keeps the others'."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "ablations.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ablations", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def summary_of(study: str, title: str) -> dict:
    """The smallest summary `markdown` renders: no rows, no claims, a plot."""
    return {
        "study": study, "title": title, "description": "", "complete": True, "columns": [],
        "rows": [], "paper_finding": "", "claims": [], "plot": "plot.png",
    }  # fmt: skip


def test_a_piece_keeps_the_sections_of_studies_it_did_not_run(tmp_path):
    ablations = load_script()
    out, store = tmp_path / "runs", tmp_path / "results" / "ablations"
    store.mkdir(parents=True)
    (store / "labels_scarce.md").write_text("## Labels scarce, run on another machine\n")
    study = out / "mask_ratio"
    study.mkdir(parents=True)
    (study / "summary.json").write_text(json.dumps(summary_of("mask_ratio", "Mask ratio now")))
    (study / "plot.png").write_bytes(b"png")

    outcome = {"code": 0, "seconds": 60.0, "command": "mae ablate mask_ratio"}
    ablations.record(out, store, "mask_ratio", outcome, machine="a CPU")
    ablations.record(out, store, "mask_ratio", outcome, machine="a CPU")  # resumed: times add up
    ablations.store_studies(out, store)
    results = tmp_path / "results" / "ablations.md"
    ablations.write_results(results, store, parallel=2, overrides=[])

    text = results.read_text()
    assert "## Mask ratio now" in text and "## Labels scarce, run on another machine" in text
    assert text.index("## Mask ratio now") < text.index("## Labels scarce")  # the pieces' order
    assert "![plot](ablations/mask_ratio-plot.png)" in text
    assert (store / "mask_ratio-plot.png").read_bytes() == b"png"
    assert "| mask_ratio | mask_ratio | `mae ablate mask_ratio` | 2.0 min | a CPU, " in text
    assert "| decoder_depth | decoder_depth |" in text and "not run" in text
    assert json.loads((store / "pieces.json").read_text())["mask_ratio"]["runs"] == 2
