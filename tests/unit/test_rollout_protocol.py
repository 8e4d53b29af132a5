"""Every rollout engine implements the whole RolloutEngine protocol (issue #24): callers call
sleep/close/shares_training_weights directly instead of guessing with getattr/hasattr."""
import inspect
import re
from types import SimpleNamespace

import pytest

from megatron_tip.rollout.base import EngineBase, RolloutEngine
from megatron_tip.rollout.colocated import TPColocatedEngine
from megatron_tip.rollout.megatron_engine import MegatronEngine
from megatron_tip.rollout.vllm_engine import VLLMEngine

MEMBERS = ("generate", "sync_weights", "sleep", "close")


@pytest.mark.parametrize("cls", [MegatronEngine, TPColocatedEngine, VLLMEngine])
def test_engines_have_every_protocol_member(cls):
    declared = {n for n in vars(RolloutEngine) if not n.startswith("_")} | set(RolloutEngine.__annotations__)
    assert declared == set(MEMBERS) | {"shares_training_weights"}
    for name in MEMBERS:
        assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    assert isinstance(getattr(cls, "shares_training_weights", None), bool), cls.__name__


def test_defaults_and_the_megatron_engine():
    assert EngineBase.shares_training_weights is False
    assert EngineBase().sleep() is None and EngineBase().close() is None
    eng = MegatronEngine(None, ctx=SimpleNamespace(), vocab_size=10, pad_id=0)
    assert eng.shares_training_weights and eng.sleep() is None and eng.close() is None


def test_callers_do_not_guess():
    """trainer, train.py and weight_sync call the protocol members directly (no getattr/hasattr probing)."""
    import megatron_tip.rollout.weight_sync as ws
    import megatron_tip.train as train
    import megatron_tip.trainer as trainer

    for mod in (ws, train, trainer):
        assert not re.search(r"(getattr|hasattr)\([^)]*engine", inspect.getsource(mod)), mod.__name__
    assert hasattr(trainer.Trainer, "sleep_engine") and not hasattr(trainer.Trainer, "release_engine")
