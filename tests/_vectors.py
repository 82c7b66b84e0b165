"""Where the PySyft/syft.js conformance vectors live (tests/vectors, see its README)."""

from pathlib import Path

VECTORS = Path(__file__).resolve().parent / "vectors" / "syftjs-0.1.4"
