"""Repository paths the tests use (no test depends on the working directory)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "examples" / "toy"
EVAL_DATA = REPO / "data" / "eval"  # MATH-500 / AIME 2024 / AIME 2025, shipped in the repository
