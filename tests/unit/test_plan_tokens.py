"""The planner's expected tokens match what the step's layout computes on rollouts drawn from the stated lengths."""
import json

import pytest
import torch

from megatron_tip.config import load_config
from megatron_tip.plan.__main__ import main
from megatron_tip.plan.tokens import parse_histogram, plan_tokens
from megatron_tip.rollout.base import Rollout
from megatron_tip.rollout.layout import microbatches, pad_rollouts, processed_tokens
from tests.helpers.paths import REPO

CONFIG = REPO / "examples" / "configs" / "qwen3_8b_to_4b.yaml"
HIST = [(200, 0.3), (700, 0.6), (2048, 0.1)]


def _drawn(cfg, n):
    """``n`` rollouts at the full prompt length with responses drawn from HIST."""
    g = torch.Generator().manual_seed(0)
    lens = torch.tensor([x for x, _ in HIST])[torch.multinomial(torch.tensor([s for _, s in HIST]), n, True,
                                                                 generator=g)]
    p = [5] * cfg.data.max_prompt_len
    return [Rollout(prompt_index=0, prompt_ids=p, response_ids=[6] * int(m)) for m in lens]


@pytest.mark.parametrize("max_tokens", [0, 8192])
def test_expected_tokens_match_the_layout_on_drawn_rollouts(max_tokens):
    cfg = load_config(None, ["data.max_prompt_len=64", "rollout.max_new_tokens=2048", "train.prompts_per_step=8",
                             "rollout.samples_per_prompt=16", "train.micro_batch_size=4",
                             f"train.max_tokens_per_microbatch={max_tokens}"])
    tp = plan_tokens(cfg, dp=2, histogram=HIST)
    assert tp.rollouts == 64
    batch = pad_rollouts(_drawn(cfg, 4000), pad_id=0)  # many draws: sample means close to the expectation
    real = float(batch.lengths.sum()) / 4000 * tp.rollouts
    assert abs(tp.real - real) / real < 0.02
    step = pad_rollouts(_drawn(cfg, tp.rollouts), pad_id=0)  # one step of this DP rank
    done = processed_tokens(microbatches(step, size=cfg.train.micro_batch_size, max_tokens=max_tokens))
    factor = done / float(step.lengths.sum())
    if max_tokens:
        assert factor <= tp.padding_factor <= 1.05 + 1e-9
    else:  # the step holds a longest response: padded exactly as planned, per real position
        assert done == tp.padded
        assert abs(factor - tp.padding_factor) / factor < 0.05


def test_plan_cli_reports_the_padding_factor_and_keeps_the_worst_case(capsys):
    assert main(["--config", str(CONFIG), "--mean-response-len", "2500", "train.max_tokens_per_microbatch=0"]) == 0
    out = capsys.readouterr().out
    # Qwen3 config: 8 prompts x 16 rollouts, prompts <= 2,048 + responses <= 8,192
    assert "mean response 2,500 of 8,192: stated mean" in out and "padding factor 2.25" in out
    assert "(train.max_tokens_per_microbatch=10240 packs by token budget, same worst-case micro-batch)" in out
    assert main(["--config", str(CONFIG), "--mean-response-len", "2500"]) == 0  # as shipped: a token budget
    out = capsys.readouterr().out
    assert "this config: token budget (10,240 per micro-batch" in out and "padding factor <= 1.05" in out
    assert "note: the memory plan" not in out  # the budget is the fixed rows' worst case: the plan covers it
    assert main(["--config", str(CONFIG), "--mean-response-len", "2500", "train.packing=thd"]) == 0
    out = capsys.readouterr().out  # THD rows hold no pad position
    assert "this config: THD packing, train.packing=thd (10,240 per micro-batch" in out and "padding factor 1.00" in out
    assert "worst case 655.4k" in out  # 64 rollouts per DP rank (DP=2) x (2,048 + 8,192)
    assert main(["--config", str(CONFIG), "--json", "--response-histogram", "1024:1",
                 "train.max_tokens_per_microbatch=20480"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["layout"] == "token budget" and tokens["padding_factor"] == pytest.approx(1.05)
    # every response 1,024 long: the padded view is only as wide as the longest sequence
    assert tokens["padded"] / tokens["real"] == pytest.approx((2048 + 1024) / (2048 + 1024 - 1))


@pytest.mark.parametrize("argv,match", [
    (["--response-histogram", "100:x"], "--response-histogram '100:x'"),
    (["--response-histogram", "100:0"], "the shares sum to 0"),
    (["--response-histogram", "9000:1"], "a length above rollout.max_new_tokens=8192"),
    (["--mean-response-len", "0"], "--mean-response-len=0: must be in [1, rollout.max_new_tokens=8192]"),
])
def test_bad_length_statements_fail_with_one_line(argv, match, capsys):
    assert main(["--config", str(CONFIG)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_parse_histogram():
    assert parse_histogram("10:0.5,20:1.5") == [(10, 0.5), (20, 1.5)]
