import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Import megatron-core once in the parent: forked ranks inherit it instead of re-importing
# (seconds per rank). Shims are NOT applied here; ranks apply them themselves.
import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import megatron.core.pipeline_parallel  # noqa: E402,F401
