"""Bad values, paths and data fail before anything loads, each with one line naming the key, file or line;
inputs that could hang the loader (alias bombs, deep nesting) fail fast with small memory."""
import json
import re
import time
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from megatron_tip.config import load_config
from megatron_tip.data import PromptDataset, read_problems
from megatron_tip.run_checks import check_inputs, shared_vocab
from megatron_tip.validation import short
from tests.helpers.paths import REPO, TOY

TINY = str(REPO / "examples" / "configs" / "tiny_cpu.yaml")


def _error(path, overrides) -> str:
    with pytest.raises(ValueError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("override,match", [
    ("data.max_prompt_len=-5", "data.max_prompt_len=-5: must be >= 1"),
    ("data.max_prompt_len=0", "data.max_prompt_len=0: must be >= 1"),
    ("train.seed=99999999999999999999", "train.seed=99999999999999999999: must be an integer in [0, 4294967295]"),
    ("train.seed=-1", "train.seed=-1: must be an integer in [0, 4294967295]"),
    ("train.steps=1", "optim.warmup_steps=2 must be smaller than train.steps=1 (for a short smoke test such as "
                      "train.steps=1, also set optim.warmup_steps=0)"),
    ("run.out_dir=[a, b]", "config key 'run.out_dir': expected a string, got a list ['a', 'b']"),
    ("train.steps={a: 1}", "config key 'train.steps': expected int, got {'a': 1}"),
    ("train.steps=[", "override train.steps: not valid YAML"),
])
def test_values_are_refused_at_load_naming_the_key(override, match):
    assert match in _error(TINY, [override])


def test_a_one_step_smoke_test_loads_as_the_message_says():
    assert load_config(TINY, ["train.steps=1", "optim.warmup_steps=0"]).train.steps == 1


def _bomb_anchors() -> list[str]:
    """A 9x9 "billion laughs": 9^9 = 387M strings once every alias is expanded."""
    lines = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return lines


def _fast_and_small(fn) -> str:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError) as e:
            fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < 50 * 2**20, (time.perf_counter() - t0, peak)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


@pytest.mark.parametrize("use", ["train:\n  steps: *a8", "run:\n  out_dir: *a8", "scoring: *a8"])
def test_yaml_alias_bomb_in_a_config_file_fails_fast(use, tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text("log:\n  tensorboard: false\n" + "".join(f"# {i}\n" for i in range(2))
                 + "x:\n" + "".join(f"  a{i}: {a}\n" for i, a in enumerate(_bomb_anchors())) + use + "\n")
    msg = _fast_and_small(lambda: load_config(str(p)))
    assert msg.startswith(f"{p}: YAML aliases expand to more than 100,000 values")


def test_yaml_alias_bomb_on_the_command_line_fails_fast():
    value = "[" + ", ".join(_bomb_anchors()) + "]"
    msg = _fast_and_small(lambda: load_config(None, [f"eval.limit={value}"]))
    assert msg.startswith("override eval.limit: YAML aliases expand to more than 100,000 values")


def test_yaml_aliases_of_ordinary_size_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("student: &m {dtype: float32, recompute_granularity: none}\nteacher: *m\ntrain: {steps: 3}\n")
    cfg = load_config(str(p))
    assert cfg.teacher.dtype == "float32" and cfg.train.steps == 3


def test_recursive_alias_and_deep_nesting_are_one_line(tmp_path):
    assert "refers to itself" in _error(None, ["eval.limit=&a [*a]"])
    assert "nested too deeply" in _error(None, ["eval.limit=" + "[" * 100_000 + "]" * 100_000])


def test_messages_bound_what_they_show():
    nested = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9
    huge = "x" * 10**8
    t0 = time.perf_counter()
    assert len(short(nested)) <= 80 and len(short(huge)) <= 80 and time.perf_counter() - t0 < 0.1


# ---- paths: checked before anything loads, naming the key --------------------------------------
@pytest.mark.parametrize("override,match", [
    ("student.path=/no/such/student", "student.path='/no/such/student': no such directory"),
    ("teacher.path=/no/such/teacher", "teacher.path='/no/such/teacher': no such directory"),
    ("data.prompts=/no/such/train.jsonl", "data.prompts='/no/such/train.jsonl': no such file"),
    ("eval.prompts=/no/such/heldout.jsonl", "eval.prompts='/no/such/heldout.jsonl': no such file"),
    ("student.path=", "student.path is not set"),
    (f"teacher.path={REPO / 'docs'}", "neither an HF checkpoint (config.json) nor a megatron checkpoint"),
    (f"student.path={TOY / 'data' / 'train.jsonl'}", "not a directory"),
    (f"data.prompts={TOY / 'data'}", "not a file"),
])
def test_every_path_is_checked_before_anything_loads(override, match):
    cfg = load_config(TINY, [override])
    with pytest.raises((ValueError, OSError)) as e:
        check_inputs(cfg)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_a_model_dir_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((TOY / "models" / "student" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="student.path=.*: no tokenizer files in"):
        check_inputs(load_config(TINY, [f"student.path={tmp_path / 'm'}"]))


def test_the_toy_config_passes_and_returns_both_specs():
    from megatron_tip.checkpoint import read_spec

    student, teacher = check_inputs(load_config(TINY))
    assert (student, teacher) == (read_spec(TOY / "models" / "student"), read_spec(TOY / "models" / "teacher"))


def test_scoring_vocab_size_is_checked_against_the_tokenizer_and_both_models():
    with pytest.raises(ValueError, match=re.escape("scoring.vocab_size=10 is smaller than the tokenizer's 279 tokens")):
        shared_vocab(279, 279, tokenizer_len=279, override=10)
    with pytest.raises(ValueError, match=re.escape("scoring.vocab_size=400 is larger than the teacher's vocab_size=300")):
        shared_vocab(512, 300, tokenizer_len=279, override=400)
    assert shared_vocab(512, 300, tokenizer_len=279) == 279 and shared_vocab(512, 300) == 300
    assert shared_vocab(512, 300, tokenizer_len=279, override=290) == 290


def test_a_micro_batch_never_holds_more_rows_than_there_are_rollouts(monkeypatch):
    """train.micro_batch_size=100000 with 4 rollouts: 4-row micro-batches, not 100,000 padded rows."""
    import megatron_tip.trainer as trainer_mod
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.rollout.layout import pad_rollouts

    packed = pad_rollouts([Rollout(prompt_index=i, prompt_ids=[1, 2], response_ids=[3, 4, 5]) for i in range(4)],
                           pad_id=0)
    seen = []
    monkeypatch.setattr(trainer_mod, "score_batch", lambda packed, mbs, **kw: seen.extend(mbs))
    fake = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(micro_batch_size=100_000, max_tokens_per_microbatch=0,
                                                                                 packing="bins"), scoring=None),
                           p=SimpleNamespace(student=None, teacher=None, vocab_size=10), ctx=SimpleNamespace(tp_group=None),
                           one_student_forward=False)
    trainer_mod.Trainer.score(fake, packed)
    assert [mb["input_ids"].shape[0] for mb in seen] == [4]
    fake.cfg.train.micro_batch_size = 3  # a short last micro-batch is still padded to the common shape
    seen.clear()
    trainer_mod.Trainer.score(fake, packed)
    assert [mb["input_ids"].shape[0] for mb in seen] == [3, 3] and int(seen[1]["valid"].sum()) == 3


# ---- data: one reader, typed fields, file:line ---------------------------------------------------
BAD_ROWS = [
    ('{"problem": null, "answer": "1"}', "'problem' must be a string, got null"),
    ('{"problem": ["x"], "answer": "1"}', "'problem' must be a string, got a list"),
    ('{"problem": "1+1", "answer": null}', "'answer' must be a string or a finite number, got null"),
    ('{"problem": "1+1", "answer": ["x"]}', "'answer' must be a string or a finite number, got a list"),
    ('{"problem": "1+1", "answer": {"a": 1}}', "'answer' must be a string or a finite number, got an object"),
    ('{"problem": "1+1", "answer": NaN}', "'answer' must be a string or a finite number, got nan"),
    ('{"problem": "1+1", "answer": true}', "'answer' must be a string or a finite number, got a boolean"),
    ('{"problem": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}', "JSON nested too deeply to read"),
]


@pytest.mark.parametrize("line,match", BAD_ROWS, ids=lambda v: v[:24] if isinstance(v, str) else None)
def test_bad_prompt_rows_are_named_by_file_and_line(line, match, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"problem": "2+2", "answer": 4}\n' + line + "\n")
    for read in (lambda: read_problems(p), lambda: PromptDataset(str(p), encode=lambda s: [1], max_prompt_len=8, seed=0)):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value) == f"{p}:2: {match}"


def test_numeric_answers_are_still_accepted(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"problem": "2+2", "answer": 4}\n{"problem": "1/2", "answer": 0.5}\n')
    ds = PromptDataset(str(p), encode=lambda s: [1], max_prompt_len=8, seed=0)
    assert [x.answer for x in ds.prompts] == ["4", "0.5"]


@pytest.mark.parametrize("line,match", [BAD_ROWS[2], BAD_ROWS[-1]], ids=["null", "deep"])
def test_eval_cli_refuses_bad_rows_in_one_line(line, match, tmp_path, capsys):
    from megatron_tip.eval.__main__ import main

    p = tmp_path / "e.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(TOY / "models" / "student"), "--data", str(p)])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [f"error: {p}:1: {match}"]


def test_eval_cli_missing_model_exits_2_like_train_and_convert(capsys):
    from megatron_tip.eval.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "/nope", "--data", str(TOY / "data" / "heldout.jsonl"), "--limit", "1"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == ["error: --model /nope: no such directory"]


def test_prompt_order_builds_each_epoch_permutation_once(tmp_path, monkeypatch):
    """The same order as a fresh permutation per prompt (the reference), with one randperm per epoch."""
    from megatron_tip.data import dataset as ds_mod
    from megatron_tip.seeding import PROMPT_ORDER, derive_seed

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"problem": str(i), "answer": str(i)}) + "\n" for i in range(7)))
    ds = PromptDataset(str(p), encode=lambda s: [1], max_prompt_len=4, seed=5)
    calls = []
    real = torch.randperm
    monkeypatch.setattr(ds_mod.torch, "randperm", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = [x.problem for s in range(6) for x in ds.batch(s, size=4)]  # 24 prompts: epochs 0..3
    monkeypatch.setattr(ds_mod.torch, "randperm", real)
    want = []
    for k in range(24):
        epoch, pos = divmod(k, 7)
        g = torch.Generator().manual_seed(derive_seed(5, PROMPT_ORDER, epoch))
        want.append(str(int(torch.randperm(7, generator=g)[pos])))
    assert got == want and len(calls) == 4


def test_per_role_layout_keys_parse() -> None:
    """teacher.parallel / rollout.tensor_parallel are one schema for every component (#23): they load,
    resolve to the student's sizes where unset, and refuse negative values naming the key."""
    from megatron_tip.config import load_config

    cfg = load_config(None, ["rollout.vllm_enforce_eager=false", "teacher.parallel.tensor_parallel=0"])
    assert cfg.rollout.vllm_enforce_eager is False and cfg.teacher.parallel.resolved(
        tensor_parallel=2, pipeline_parallel=1) == (2, 1)
    with pytest.raises(ValueError, match=r"teacher.parallel.tensor_parallel=-1: must be >= 0"):
        load_config(None, ["teacher.parallel.tensor_parallel=-1"])
    own = load_config(None, ["teacher.parallel.tensor_parallel=2", "teacher.offload=true", "parallel.tensor_parallel=2",
                             "rollout.engine=vllm", "rollout.tensor_parallel=1"])
    assert own.teacher.own_layout and own.teacher.offload and own.rollout.tensor_parallel == 1
    with pytest.raises(ValueError, match="rollout.tensor_parallel=2 must divide parallel.tensor_parallel=1"):
        load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel=2"])
