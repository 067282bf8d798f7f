"""The backend interface is code: every registered backend module satisfies backends.Backend,
with the Protocol's parameter names (the ops call backends by keyword and by position alike)."""
import importlib
import inspect
import types

import pytest

from hykernels import backends

METHODS = [name for name, value in vars(backends.Backend).items()
           if inspect.isfunction(value) and not name.startswith("_")]


def mismatches(module) -> list:
    """What keeps ``module`` from satisfying the Protocol: missing names, or functions whose
    parameters differ from the Protocol's (``self`` aside)."""
    out = [f"{name} missing" for name in ("NAME", "DTYPES", *METHODS) if not hasattr(module, name)]
    for name in METHODS:
        if hasattr(module, name):
            want = list(inspect.signature(getattr(backends.Backend, name)).parameters)[1:]
            got = list(inspect.signature(getattr(module, name)).parameters)
            if got != want:
                out.append(f"{name}{tuple(got)} != {tuple(want)}")
    return out


def test_the_protocol_lists_the_whole_interface():
    assert set(METHODS) == {"availability", "token_stats", "token_partials", "token_stats_backward", "fused_loss",
                            "segment_sum", "prg_scores"}


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_satisfies_the_protocol(name):
    try:
        module = importlib.import_module(backends._MODULES[name])
    except ImportError as exc:  # an optional dependency (triton) missing: nothing registered to check
        pytest.skip(f"{name}: {exc}")
    assert isinstance(module, backends.Backend)
    assert mismatches(module) == []
    assert module.NAME == name


def test_a_backend_that_drifts_is_caught():
    """A module missing a function, or with a renamed parameter, fails the same check."""
    reference = importlib.import_module(backends._MODULES["reference"])
    drifted = types.ModuleType("drifted")
    drifted.__dict__.update({k: v for k, v in vars(reference).items() if k != "prg_scores"})
    assert not isinstance(drifted, backends.Backend) and mismatches(drifted) == ["prg_scores missing"]
    drifted.prg_scores = lambda support, offsets, variant, eps, tau_g: None
    assert mismatches(drifted) == ["prg_scores('support', 'offsets', 'variant', 'eps', 'tau_g') != "
                                   "('support', 'probe_offsets', 'variant', 'eps', 'tau_g')"]
