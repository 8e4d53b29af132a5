"""The run configuration: YAML file + dotted command-line overrides -> one typed, validated RunConfig.

Each section is a dataclass owned by its component (``student``/``teacher``: models.config,
``parallel``: distributed, ``data``: data, ``rollout``: rollout.config, ``selection``:
selection.config, ``optim``: optim, ``train``: trainer, ``scoring``: scoring, ``run``:
checkpoint.training, ``log``: metrics_log, ``eval``: eval.heldout); this module only composes
them. Types come from the annotations, ranges from each section's ``__post_init__``, so an
unknown key or a bad value fails at load time, naming it, before any model is built.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_tip.checkpoint.training import RunDirConfig
from megatron_tip.data.dataset import DataConfig
from megatron_tip.distributed import ParallelConfig
from megatron_tip.eval.heldout import EvalConfig
from megatron_tip.metrics_log import LogConfig
from megatron_tip.models.config import ModelConfig
from megatron_tip.optim import OptimConfig
from megatron_tip.rollout.config import RolloutConfig
from megatron_tip.scoring import ScoringConfig
from megatron_tip.selection import SelectionConfig
from megatron_tip.trainer import TrainConfig

# Keys that moved to their component's section (old configs get a pointer, not just "unknown").
MOVED_KEYS = {
    "train.out_dir": "run.out_dir", "train.resume": "run.resume", "train.save_every": "run.save_every",
    "train.exit_interval": "run.exit_interval", "train.stats_chunk_size": "scoring.stats_chunk_size",
    "train.score_chunk_tokens": "scoring.score_chunk_tokens", "train.vocab_size": "scoring.vocab_size",
    "train.tensorboard": "log.tensorboard", "train.dump_token_stats": "log.dump_token_stats",
    "train.eval_prompts": "eval.prompts", "train.eval_limit": "eval.limit", "train.eval_before": "eval.before",
}


@dataclass
class RunConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunDirConfig = field(default_factory=RunDirConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.rollout.check_parallel(pipeline_parallel=self.parallel.pipeline_parallel)
        if self.teacher.recompute_granularity != "none":
            raise ValueError("teacher.recompute_granularity: the teacher runs without gradients and keeps no "
                             "activations; activation recomputation applies to the student only")
        longest = self.data.max_prompt_len + self.rollout.max_new_tokens
        if 0 < self.train.max_tokens_per_microbatch < longest:  # one rollout must fit a micro-batch
            raise ValueError(f"train.max_tokens_per_microbatch={self.train.max_tokens_per_microbatch} is smaller than "
                             f"the longest allowed sequence data.max_prompt_len + rollout.max_new_tokens = {longest}")
        if self.optim.warmup_steps and self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than "
                             f"train.steps={self.train.steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None or value == "null" else _coerce(value, args[0], key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"config key {key!r}: expected int, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = [prefix + k + (f" (moved to {MOVED_KEYS[prefix + k]})" if prefix + k in MOVED_KEYS else "")
                 for k in unknown]
        raise ValueError(f"unknown config key(s): {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        if msg.split("=", 1)[0] in fields:  # "<field>=<value>: must be ..." -> "<section>.<field>=..."
            raise ValueError(f"{prefix}{msg}") from None
        raise ValueError(f"config section {prefix.rstrip('.')}: {msg}" if prefix else msg) from None


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read YAML ``path`` (optional), apply ``key.sub=value`` overrides, validate, return RunConfig.

    Relative paths inside the YAML are resolved against the YAML file's folder when they exist
    there, so configs work from any working directory.
    """
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        tree = _read_yaml(p)
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        _set_dotted(tree, k.strip(), v)
    cfg = _build(RunConfig, tree, "")
    if path:
        base = Path(path).resolve().parent
        for section in (cfg.student, cfg.teacher):
            section.path = _resolve(section.path, base)
        cfg.data.prompts = _resolve(cfg.data.prompts, base)
        cfg.eval.prompts = _resolve(cfg.eval.prompts, base)
    return cfg


def _read_yaml(p: Path) -> dict[str, Any]:
    """The config file as a mapping of sections; ValueError naming the file, line and problem."""
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ValueError(f"{p}: a config file is a mapping of sections (student:, teacher:, ...), "
                         f"got a {type(tree).__name__}")
    return tree


def _resolve(value: str, base: Path) -> str:
    if not value or Path(value).is_absolute() or Path(value).exists():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value
