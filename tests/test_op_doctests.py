"""Every operators module's doctests pass, and every public operator class carries an example."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["operators.stateless", "operators.aggregations", "operators.keyed", "operators.keyed_vectorized",
           "operators.window", "operators.sources", "operators.sinks"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0, f"{name} has no doctests"
    assert result.failed == 0, f"{result.failed} doctest failure(s) in {name}"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_class_has_an_example(name):
    module = importlib.import_module(name)
    missing = [attr for attr in module.__all__
               if isinstance(getattr(module, attr), type) and ">>>" not in (getattr(module, attr).__doc__ or "")]
    assert missing == []
