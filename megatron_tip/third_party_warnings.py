"""Known third-party warnings that say nothing actionable to a user of this package, filtered once.

Each filter names the message and the module that issues it, so any other warning (ours included,
and these messages from elsewhere) stays visible. Call :func:`filter_third_party_warnings` at
start-up, before megatron-core is imported (most of these fire at import time).
"""
from __future__ import annotations

import warnings

# (message regex, category, issuing module regex, why it is noise here)
KNOWN = (
    (r"(Transformer Engine and )?Apex (is|are) not installed", UserWarning, r"megatron\.core(\.|$)",
     "the fallbacks it announces are the CPU/local layers this package chooses"),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config",
     "megatron's own default cuda_graph_scope; we never set it"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing(\.|$)",
     "megatron's dist_checkpointing load calls torch's old name"),
    # Attributed to whichever frame calls torch's ShardedTensor constructor: megatron's
    # dist_checkpointing, or on CPU the torch-function shim that forwards megatron's calls.
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     r"(torch\.distributed|megatron\.core|megatron_tip\.compat\.cpu)(\.|$)",
     "torch's ShardedTensor, used inside megatron's dist_checkpointing"),
)


def filter_third_party_warnings() -> None:
    """Ignore the :data:`KNOWN` third-party warnings (message + module); idempotent."""
    for message, category, module, _why in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
