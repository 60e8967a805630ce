"""Behaviour is unchanged: every contract case's maps equal the saved ones (tests/behaviour_fixture.py).

The fixture was computed before the backend seam was refactored. On the machine kind that wrote
it (same torch build, CPU capability and thread count) the maps must be equal bit for bit;
elsewhere other kernels or reduction orders round differently (4e-6 seen with one thread), so
they must agree to 2e-5.
"""

from __future__ import annotations

import pytest
import torch
from backend_cases import CASES_BY_NAME
from behaviour_fixture import FIXTURE, bundled_outputs, case_outputs, machine
from safetensors import safe_open


def _saved(prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    with safe_open(str(FIXTURE), framework="pt") as handle:
        written_on = (handle.metadata() or {}).get("machine", "")
        return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}, written_on  # noqa: SIM118


def _compare(got: dict[str, torch.Tensor], prefix: str) -> None:
    saved, written_on = _saved(prefix)
    assert saved, f"no saved tensors under {prefix!r}"
    assert sorted(got) == sorted(saved)
    exact = written_on == machine()
    for key, expected in saved.items():
        value = got[key].float()
        assert value.shape == expected.shape, key
        if exact:
            assert torch.equal(value, expected), f"{key}: max |diff| {(value - expected).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(value, expected, rtol=0, atol=2e-5, msg=key)


def _saved_cases() -> list[str]:
    with safe_open(str(FIXTURE), framework="pt") as handle:
        return sorted({key.split("/")[0] for key in handle.keys()} - {"bundled"})  # noqa: SIM118


SAVED = _saved_cases()  # the backends that existed when the fixture was written; later ones have no "before"


def test_every_saved_case_is_still_a_contract_case():
    assert len(SAVED) == 10 and set(SAVED) <= set(CASES_BY_NAME)


@pytest.mark.parametrize("name", SAVED)
def test_maps_equal_the_saved_behaviour(name: str):
    _compare(case_outputs(CASES_BY_NAME[name]), f"{name}/")


def test_bundled_demo_scenes_equal_the_saved_behaviour():
    _compare(bundled_outputs(), "bundled/")
