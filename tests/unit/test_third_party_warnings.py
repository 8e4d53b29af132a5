"""The known megatron/apex/torch start-up warnings are filtered by message and module; others stay."""
import subprocess
import sys
import warnings

from megatron_tip.third_party_warnings import KNOWN, filter_third_party_warnings
from tests.helpers.paths import REPO

SEEN = [  # (message, category, issuing module) exactly as megatron-core 0.16.1 / torch 2.13 issue them
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.", UserWarning,
     "megatron.core.transformer.transformer_config"),
    ("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` instead.",
     FutureWarning, "megatron.core.dist_checkpointing.strategies.torch"),
    ("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
     "megatron_tip.compat.cpu"),
]


def _issued(message, category, module) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_third_party_warnings()
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return caught


def test_known_third_party_warnings_are_filtered():
    assert len(SEEN) == len(KNOWN) + 1  # every filter has a real case (the Apex one two)
    for case in SEEN:
        assert not _issued(*case), case


def test_other_warnings_stay_visible():
    assert _issued("megatron_tip.ops: torch.compile failed (x); using eager", UserWarning, "megatron_tip.ops.compiled")
    assert _issued("Apex is not installed. Falling back to Torch Norm", UserWarning, "somebody.else")
    assert _issued("full scope is deprecated", UserWarning, "megatron.core.models.gpt")
    assert _issued("something else entirely", FutureWarning, "megatron.core.dist_checkpointing.strategies.torch")


def test_the_trainer_start_up_prints_no_known_warning():
    # The trainer installs the filters at import; the megatron modules a run then imports warn at import.
    code = ("import megatron_tip.train, megatron.core.optimizer, megatron.core.models.backends, "
            "megatron.core.models.gpt.gpt_layer_specs")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr[-2000:]
