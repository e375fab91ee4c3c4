import os

import pytest

from ratplus.runtime import available_memory, check_fits_memory


def test_available_memory_is_at_most_total_ram():
    avail = available_memory("cpu")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert avail is not None and 0 < avail <= total


def test_check_fits_memory_uses_available_not_total():
    avail = available_memory("cpu")
    check_fits_memory(avail // 4, "a small request")
    with pytest.raises(ValueError, match=r"needs .* GiB, more than the .* GiB available on cpu"):
        check_fits_memory(avail + 2**32, "a request just past what is free")
    assert available_memory("meta") is None
    check_fits_memory(2**62, "anything on meta", "meta")  # unknown: no check
