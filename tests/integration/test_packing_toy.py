"""The toy run (README command 1's config) gives the same per-step losses with token-budget
micro-batches as with padding: same rollouts, same selection, losses equal to float tolerance; the
same with THD packing (megatron's THD path, the local attention kernel per cu_seqlens segment:
tests/helpers/thd_attention.py), which computes no pad position."""
import contextlib
import json

import pytest

from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO

pytestmark = pytest.mark.timeout(600)

TOY = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _main(rank, world, argv):
    from megatron_tip.train import main
    from tests.helpers.thd_attention import thd_on_local_spec

    with thd_on_local_spec() if "train.packing=thd" in argv else contextlib.nullcontext():
        return main(argv)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_toy_losses_with_token_budget_equal_padded(tmp_path):
    runs = {}
    for name, budget, packing in (("padded", 0, "bins"), ("packed", 1280, "bins"), ("thd", 1280, "thd")):
        out = tmp_path / name
        run_distributed(_main, 1, ["--config", str(TOY), "train.steps=3", "train.prompts_per_step=8", "eval.prompts=",
                                   "run.save_every=0", "log.tensorboard=false", f"run.out_dir={out}",
                                   f"train.max_tokens_per_microbatch={budget}", f"train.packing={packing}"],
                        timeout=600)
        runs[name] = _metrics(out)
    pad, pack, thd = runs["padded"], runs["packed"], runs["thd"]
    assert len(pad) == len(pack) == len(thd) == 3
    for a, b, c in zip(pad, pack, thd):
        assert a["response_len"] == b["response_len"] and a["rollout_accuracy"] == b["rollout_accuracy"]
        assert a["n_kept"] == b["n_kept"]  # the same selection
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["padding_factor"] < a["padding_factor"] and b["padding_factor"] <= 1.05
        assert c["response_len"] == a["response_len"] and c["n_kept"] == a["n_kept"]
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert c["padding_factor"] == 1.0  # THD rows hold no pad position
