"""Repository paths the tests use (no test depends on the working directory)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "examples" / "toy"
SHARED_DATA = REPO.parent / "shared" / "data"  # MATH-500 / AIME beside the checkout, when present
