"""The compiler tests need torch: without it the whole directory is skipped."""

import pytest

pytest.importorskip("torch")
