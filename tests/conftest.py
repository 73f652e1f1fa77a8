"""Test-wide settings, and fixtures that force what the hardware would decide."""

import pytest
import torch

from openmae import hardware

# The tests use tiny models, for which one thread is as fast as two, and it keeps them from
# fighting over the cores (OpenMP spin-waits) when anything else runs on the machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def private_tuner_cache(tmp_path_factory):
    """The runs the tests start keep their measured choices in a folder of this session, not in the
    user's `~/.cache/openmae` (whose choices, made for real models, would then skip measurements the
    tests expect, and which the tests' toy shapes would fill)."""
    folder = tmp_path_factory.mktemp("openmae-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENMAE_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(params=[True, False], ids=["bf16-units", "no-bf16-units"])
def bf16_units(request, monkeypatch) -> bool:
    """Run the test twice: as on a CPU with bf16 matrix units (AVX512-BF16 / AMX) and as on one
    without (AVX2 only), whatever this machine has. The value is the forced answer."""
    monkeypatch.setattr(hardware, "cpu_has_matrix_units", lambda dtype: request.param)
    return request.param
