"""Checks of a run's inputs that read small files but load nothing: paths, model specs, layout, vocabulary.

``check_inputs(cfg)`` runs before the process group starts (``train.main``) and again at the top of
``build``; ``check_layout`` is also what the planner calls, so the trainer and the planner refuse
the same layouts with the same message. Every error is a ValueError / FileNotFoundError naming the
config key and the value (``error: ...``, exit code 2 in the CLIs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_tip.distributed import check_parallel_sizes
from megatron_tip.checkpoint.layout import HF_CONFIG, SPEC_FILE, read_spec, tokenizer_dir
from megatron_tip.models.spec import ModelSpec, check_model_parallel
from megatron_tip.teacher.checks import check_teacher_layout, check_teacher_source
from megatron_tip.validation import short

# Any of these makes a directory loadable by AutoTokenizer without the hub.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _shown(path: str) -> str:
    """A path as the message shows it: whole (users copy it), unless absurdly long."""
    return repr(path) if len(path) <= 1000 else short(path)


def _where(value: str) -> str:
    return "" if Path(value).is_absolute() else " (a relative path is read from the working directory, then beside the config file)"


def check_model_dir(key: str, value: str) -> None:
    """``value`` is an HF checkpoint dir or a megatron checkpoint dir; else FileNotFoundError naming ``key``."""
    if not value:
        raise ValueError(f"{key} is not set: give an HF or megatron checkpoint directory")
    p = Path(value)
    if not p.exists():
        raise FileNotFoundError(f"{key}={_shown(value)}: no such directory{_where(value)}")
    if not p.is_dir():
        raise NotADirectoryError(f"{key}={_shown(value)}: not a directory (a model is a checkpoint directory)")
    if not (p / HF_CONFIG).is_file() and not (p / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{key}={_shown(value)}: neither an HF checkpoint ({HF_CONFIG}) nor a megatron "
                                f"checkpoint ({SPEC_FILE})")
    tok = Path(tokenizer_dir(p))
    if not any((tok / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}={_shown(value)}: no tokenizer files in {_shown(str(tok))} "
                                f"(one of {', '.join(TOKENIZER_FILES)})")


def check_data_file(key: str, value: str) -> None:
    """``value`` is an existing file; else FileNotFoundError naming ``key``."""
    if not value:
        raise ValueError(f"{key} is not set: give a JSONL file of {{problem, answer}} rows")
    p = Path(value)
    if not p.exists():
        raise FileNotFoundError(f"{key}={_shown(value)}: no such file{_where(value)}")
    if not p.is_file():
        raise IsADirectoryError(f"{key}={_shown(value)}: not a file")


def check_paths(cfg: Any) -> None:
    """Every model, tokenizer and data path of the run exists and is of the right kind (nothing is read)."""
    check_model_dir("student.path", cfg.student.path)
    check_model_dir("teacher.path", cfg.teacher.path)
    check_data_file("data.prompts", cfg.data.prompts)
    if cfg.eval.prompts:
        check_data_file("eval.prompts", cfg.eval.prompts)


def shared_vocab(student_vocab: int, teacher_vocab: int, *, tokenizer_len: Optional[int] = None,
                 override: Optional[int] = None) -> int:
    """The true vocabulary both models are compared on (docs/method.md, "Padded vocabulary").

    ``scoring.vocab_size`` (``override``) when set, else the tokenizer's length, else (the planner,
    which has no tokenizer) the smaller model vocabulary. HF configs often pad the embedding
    (Qwen2.5: 151,936 vs 152,064); what must agree is the tokenizer's range: a model smaller than
    it is a real mismatch, and an override smaller than it would leave token ids unscored.
    """
    v = override or tokenizer_len or min(student_vocab, teacher_vocab)
    if override and tokenizer_len and override < tokenizer_len:
        raise ValueError(f"scoring.vocab_size={override} is smaller than the tokenizer's {tokenizer_len} tokens: "
                         f"prompts and rollouts hold ids up to {tokenizer_len - 1}; leave scoring.vocab_size unset "
                         f"(the tokenizer's length) or set it to at least {tokenizer_len}")
    for name, size in (("student", student_vocab), ("teacher", teacher_vocab)):
        if override and size < override:
            raise ValueError(f"scoring.vocab_size={override} is larger than the {name}'s vocab_size={size}: the "
                             f"shared vocabulary must lie within both models' output rows")
        if size < v:
            raise ValueError(f"{name} vocab_size={size} is smaller than the shared vocabulary {v} (tokenizer "
                             f"length or scoring.vocab_size): the teacher's vocabulary differs from the "
                             f"student's beyond padding")
    return v


def check_layout(cfg: Any, *, student: ModelSpec, teacher: ModelSpec, world_size: Optional[int] = None) -> None:
    """The parallel layout and sizes of ``cfg`` fit both models (and ``world_size`` ranks when given).

    The trainer calls it before any weight loads, the planner before it plans: one set of refusals.
    """
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    if world_size is not None:
        dp = check_parallel_sizes(world_size, tp=tp, pp=pp)
        if cfg.train.prompts_per_step % dp:
            raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not divisible by "
                             f"the data-parallel size {dp}")
    check_model_parallel(student, tp=tp, pp=pp, name="student")
    check_teacher_layout(cfg, teacher=teacher, world_size=world_size)
    need = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    for name, spec in (("student", student), ("teacher", teacher)):
        if need > spec.max_position_embeddings:
            raise ValueError(f"data.max_prompt_len + rollout.max_new_tokens = {cfg.data.max_prompt_len} + "
                             f"{cfg.rollout.max_new_tokens} = {need} exceeds the {name}'s "
                             f"max_position_embeddings={spec.max_position_embeddings}")
    check_recompute(cfg.student, num_layers=student.num_layers, pp=pp)
    shared_vocab(student.vocab_size, teacher.vocab_size, override=cfg.scoring.vocab_size)


def check_recompute(mc: Any, *, num_layers: int, pp: int) -> None:
    """Full recomputation's layer count fits a pipeline stage of the student (``mc``: its ModelConfig)."""
    per_stage = num_layers // pp
    if mc.recompute_granularity == "full" and mc.recompute_num_layers > per_stage:
        raise ValueError(f"student.recompute_num_layers={mc.recompute_num_layers} exceeds the {per_stage} layers "
                         f"of a pipeline stage ({num_layers} layers / pipeline_parallel={pp})")
    if mc.recompute_granularity == "full" and mc.recompute_method == "uniform" and per_stage % mc.recompute_num_layers:
        raise ValueError(f"student.recompute_num_layers={mc.recompute_num_layers} must divide the {per_stage} layers "
                         f"of a pipeline stage with recompute_method=uniform")


def check_inputs(cfg: Any, *, world_size: Optional[int] = None) -> tuple[ModelSpec, ModelSpec]:
    """All checks that need the run's files but load nothing; returns (student spec, teacher spec).

    Paths first (so a wrong path is named before anything reads it, and never reaches a hub
    lookup), then both models' specs against the layout, sequence length and vocabulary.
    """
    check_paths(cfg)
    check_teacher_source(cfg)
    student, teacher = read_spec(cfg.student.path), read_spec(cfg.teacher.path)
    check_layout(cfg, student=student, teacher=teacher, world_size=world_size)
    return student, teacher
