"""HF -> megatron (TP=1, TP=2, PP=2) -> HF on tiny random Qwen3 / Llama-3.1 / Qwen2 models.

Each case loads the HF checkpoint into real megatron ranks, checks megatron logits against HF
logits (fp32, max |Δ| <= 1e-4), saves the checkpoint dir, and exports it back to HF (loaded at
TP=1, so checkpoints written at TP=2 / PP=2 are resharded), which must reproduce every tensor
bit for bit and the config.
"""
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.convert_cases import VOCAB, make_hf_model, token_batch
from megatron_tip.launch import run_distributed

pytestmark = pytest.mark.timeout(600)
TOL = 1e-4
MEASURED: dict = {}  # (family, tp, pp) -> max |Δlogit|, printed at the end with -s


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from megatron_tip.convert.verify import hf_logits

    out = {}
    for fam in ("qwen3", "llama", "qwen2"):
        d = make_hf_model(fam, tmp_path_factory.mktemp(fam) / "hf")
        out[fam] = (d, hf_logits(str(d), token_batch()))
    return out


def _convert_and_forward(rank, world, tp, pp, hf_dir, out_dir, ids):
    from megatron_tip.checkpoint import save_megatron_checkpoint
    from megatron_tip.models.hf import load_hf_weights
    from megatron_tip.convert.run import read_hf_spec
    from megatron_tip.convert.verify import megatron_logits
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models import build_gpt_model
    from megatron_tip.models.sharding import layer_offset

    spec = read_hf_spec(hf_dir)
    ctx = init_parallel(tp, pp=pp)
    model = build_gpt_model(spec, tp=tp, pp=pp, pp_rank=ctx.pp_rank)
    load_hf_weights(model, hf_dir, spec=spec, tp=tp, tp_rank=ctx.tp_rank,
                    layer_offset=layer_offset(spec.num_layers, pp=pp, pp_rank=ctx.pp_rank))
    save_megatron_checkpoint(model, out_dir, spec=spec, tp=tp, pp=pp, hf_dir=hf_dir)
    logits = megatron_logits(model, ids, tp_group=ctx.tp_group, is_last_stage=ctx.is_last_stage,
                             vocab_size=spec.vocab_size)
    return logits if ctx.tp_rank == 0 else None


def _safetensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _check_round_trip(hf_dir: Path, mg_dir: Path, out: Path, **kw) -> None:
    from megatron_tip.convert import megatron_to_hf

    megatron_to_hf(mg_dir, out, **kw)
    a, b = _safetensors(hf_dir), _safetensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    ca.pop("transformers_version"), cb.pop("transformers_version")
    assert ca == cb
    for f in ("generation_config.json", "tokenizer_config.json"):
        if (hf_dir / f).exists():
            assert (out / f).read_text() == (hf_dir / f).read_text()
        assert (out / f).exists() == (hf_dir / f).exists()
    assert not list(out.parent.glob(".*.tmp"))


CASES = [
    pytest.param("qwen3", 2, 1, id="qwen3-tp2"),
    pytest.param("llama", 1, 2, id="llama-pp2"),
    pytest.param("qwen2", 1, 2, id="qwen2-pp2"),
    pytest.param("qwen3", 1, 1, id="qwen3-tp1", marks=pytest.mark.slow),
    pytest.param("qwen3", 1, 2, id="qwen3-pp2", marks=pytest.mark.slow),
    pytest.param("llama", 1, 1, id="llama-tp1", marks=pytest.mark.slow),
    pytest.param("llama", 2, 1, id="llama-tp2", marks=pytest.mark.slow),
    pytest.param("qwen2", 1, 1, id="qwen2-tp1", marks=pytest.mark.slow),
    pytest.param("qwen2", 2, 1, id="qwen2-tp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family,tp,pp", CASES)
def test_logits_match_hf_and_round_trip_is_bit_exact(hf_models, tmp_path, family, tp, pp):
    from megatron_tip.convert.verify import compare_logits

    hf_dir, ref = hf_models[family]
    mg = tmp_path / "mg"
    outs = run_distributed(_convert_and_forward, tp * pp, tp, pp, str(hf_dir), str(mg), token_batch())
    logits = [o for o in outs if o is not None]
    assert len(logits) == 1 and logits[0].shape == (2, 32, VOCAB)
    stats = compare_logits(ref, logits[0])
    MEASURED[(family, tp, pp)] = stats["max_abs_diff"]
    print(f"\n{family} TP={tp} PP={pp}: max|dlogit|={stats['max_abs_diff']:.2e} KL={stats['mean_kl']:.2e}")
    assert stats["max_abs_diff"] <= TOL, stats
    meta = json.loads((mg / "metadata.json").read_text())
    assert (meta["tp"], meta["pp"]) == (tp, pp)
    _check_round_trip(hf_dir, mg, tmp_path / "hf_out")


def test_llama_rope_scaling_is_visible_in_logits(hf_models):
    """The llama3 rope scaling changes these logits far beyond TOL, so the match above checks it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_tip.models.hf.rope import read_rope, rope_config_keys

    hf_dir, ref = hf_models["llama"]
    d = json.loads((hf_dir / "config.json").read_text())
    theta, scaling, layout = read_rope(d)
    assert scaling is not None
    plain = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    plain.update(rope_config_keys(theta, None, layout))  # same theta, no scaling, in the file's own layout
    cfg = AutoConfig.for_model(plain.pop("model_type"), **plain)
    m = AutoModelForCausalLM.from_pretrained(hf_dir, config=cfg, attn_implementation="eager")
    with torch.no_grad():
        plain = m(token_batch()).logits
    assert (plain - ref).abs().max() > 100 * TOL


@pytest.mark.slow  # CI time; the logits/round-trip cases stay in CI
def test_tp2_checkpoint_loads_at_tp1_with_other_vocab_padding(tmp_path):
    """Vocab 300 pads to 512 rows at TP=2 but 384 at TP=1: resharding must still work."""
    from megatron_tip.convert import hf_to_megatron
    from megatron_tip.convert.verify import compare_logits, hf_logits, megatron_checkpoint_logits

    hf_dir = make_hf_model("qwen3", tmp_path / "hf", vocab=300)
    hf_to_megatron(hf_dir, tmp_path / "mg", tp=2)
    ids = token_batch() + 100  # also hits rows past 256
    ref = hf_logits(str(hf_dir), ids)
    out = megatron_checkpoint_logits(str(tmp_path / "mg"), ids, tp=1)
    stats = compare_logits(ref, out)
    print(f"\nqwen3 vocab=300 saved TP=2 loaded TP=1: max|dlogit|={stats['max_abs_diff']:.2e}")
    assert stats["max_abs_diff"] <= TOL, stats
    # The other direction: 384 saved rows re-padded to 512 and split at the shard's own offset.
    hf_to_megatron(hf_dir, tmp_path / "mg1", tp=1)
    stats = compare_logits(ref, megatron_checkpoint_logits(str(tmp_path / "mg1"), ids, tp=2))
    assert stats["max_abs_diff"] <= TOL, stats


@pytest.mark.slow
def test_bf16_checkpoint_round_trip_is_bit_exact(tmp_path):
    """dtype auto: a bf16 HF model stays bf16 in megatron (TP=2) and comes back bit for bit."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.convert_cases import hf_config
    from megatron_tip.convert import hf_to_megatron

    cfg = hf_config("llama")
    cfg.torch_dtype = "bfloat16"
    AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "mg", tp=2)
    assert json.loads((tmp_path / "mg" / "metadata.json").read_text())["params_dtype"] == "bfloat16"
    _check_round_trip(tmp_path / "hf", tmp_path / "mg", tmp_path / "out")
