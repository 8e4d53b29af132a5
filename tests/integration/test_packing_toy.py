"""The toy run (README command 1's config) gives the same per-step losses with token-budget
micro-batches as with padding: same rollouts, same selection, losses equal to float tolerance."""
import json

import pytest

from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO

pytestmark = pytest.mark.timeout(600)

TOY = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _main(rank, world, argv):
    from megatron_tip.train import main

    return main(argv)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_toy_losses_with_token_budget_equal_padded(tmp_path):
    runs = {}
    for name, budget in (("padded", 0), ("packed", 1280)):
        out = tmp_path / name
        run_distributed(_main, 1, ["--config", str(TOY), "train.steps=3", "train.prompts_per_step=8", "eval.prompts=",
                                   "run.save_every=0", "log.tensorboard=false", f"run.out_dir={out}",
                                   f"train.max_tokens_per_microbatch={budget}"], timeout=600)
        runs[name] = _metrics(out)
    pad, pack = runs["padded"], runs["packed"]
    assert len(pad) == len(pack) == 3
    for a, b in zip(pad, pack):
        assert a["response_len"] == b["response_len"] and a["rollout_accuracy"] == b["rollout_accuracy"]
        assert a["n_kept"] == b["n_kept"]  # the same selection
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["padding_factor"] < a["padding_factor"] and b["padding_factor"] <= 1.05
