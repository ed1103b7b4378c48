"""Marks shared by every test folder."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_cpp_compiler: skip unless a C++ compiler is on PATH (torch.compile's "
                                       "inductor builds its CPU kernels with it)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_cpp_compiler") is None:
        return
    from unifusion.train.trainer import has_cpp_compiler

    if not has_cpp_compiler():
        pytest.skip("torch.compile's inductor needs a C++ compiler (g++, clang++ or c++) on PATH")
