import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Import megatron-core once in the parent: forked ranks inherit it instead of re-importing
# (seconds per rank). Shims are NOT applied here; ranks apply them themselves.
import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401

import sys  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.paths import TOY  # noqa: E402


sys.path.insert(0, str(TOY))  # the toy task's modules (task.py, train_models.py) import as top-level


@pytest.fixture(scope="module")
def tokenizer():
    """The toy task's shipped tokenizer (examples/toy/models/tokenizer; loads under transformers 4 and 5)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOY / "models" / "tokenizer")


def pytest_collection_modifyitems(config, items):
    """Slurm tests first (stable sort): their jobs then run beside the other files instead of
    forming the tail of a 2-worker run (CI time)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slurm") else 1)
