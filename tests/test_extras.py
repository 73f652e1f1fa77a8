"""Optional features: a missing package is one line naming the extra that installs it."""

import sys
from pathlib import Path

import pytest
import tomllib

from openmae import extras
from openmae.cli import main
from openmae.extras import MissingExtraError, require
from openmae.models import create_model


@pytest.mark.parametrize("module", sorted(extras.EXTRAS))
def test_every_optional_module_is_declared_in_its_extra(module):
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    distribution, extra, _ = extras.EXTRAS[module]
    declared = [r.split(">")[0].split("=")[0] for r in project["optional-dependencies"][extra]]
    assert distribution in declared
    assert require(module) is sys.modules[module]  # the test extra installs every optional package


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(MissingExtraError, match=r"needs transformers, .*pip install 'openmae\[hf\]'"):
        require("transformers")
    assert not extras.available("transformers")
    with pytest.raises(ImportError):  # still an ImportError for code that expects one
        require("transformers")


def test_hf_export_without_transformers_is_a_one_line_error(monkeypatch):
    from openmae import to_hf

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"openmae\[hf\]"):
        to_hf(create_model("mae_vit_debug"))


def test_bench_without_transformers_is_a_one_line_error_with_exit_code_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    argv = ["bench", "--model", "mae_vit_debug", "--batch", "2", "--precisions", "fp32",
            "--peers", "hf_eager", "--in-process", "--no-profile",
            "--steps", "1", "--warmup", "1", "--repeats", "1",
            "--peak-size", "64", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "openmae[hf]" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_sample_photos_without_scikit_image_name_the_extra(monkeypatch):
    from openmae.data.samples import sample_photos

    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingExtraError, match=r"openmae\[photos\]"):
        sample_photos()
