"""Fixtures for the pure node-helper tests (the loader lives in node_pack.py, a module name
no other test folder uses, so importing it never picks up another folder's conftest)."""

import pytest

from node_pack import pack_module


@pytest.fixture(scope="session")
def pack():
    return pack_module
