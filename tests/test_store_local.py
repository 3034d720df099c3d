from __future__ import annotations

import pytest
from store_contract import StoreContract

from ragline.store.local import LocalStore


class TestLocalStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = LocalStore(tmp_path / "index")
        yield store
        store.close()

    @pytest.fixture
    def reopen(self, tmp_path):
        opened = []

        def _reopen():
            opened.append(LocalStore(tmp_path / "index"))
            return opened[-1]

        yield _reopen
        for store in opened:
            store.close()
