"""The soak's short form (`make soak` runs the long one): 32 streaming clients for 20 s."""

from __future__ import annotations

import pytest

from tests.reliability.soak import check, soak


@pytest.mark.timeout(300)
def test_short_soak() -> None:
    figures = soak(minutes=20 / 60, clients=32)
    print(figures)
    assert check(figures) == []
