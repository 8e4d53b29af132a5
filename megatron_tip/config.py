"""The run configuration: YAML file + dotted command-line overrides -> one typed, validated RunConfig.

Each section is a plain dataclass of its component, in a module that imports no torch and no
runtime module (``student``/``teacher``: models.config, ``data``: data.config, ``rollout``:
rollout.config, ``selection``: selection.config, ``run``: checkpoint.config, ``eval``: eval.config;
the top-level components' ``parallel``, ``optim``, ``train``, ``scoring``, ``log``: sections), so
importing this module loads neither torch nor megatron; this module only composes them. Types come from the annotations, ranges from each section's ``__post_init__``, so an
unknown key or a bad value fails at load time, naming it, before any model is built.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_tip.checkpoint.config import RunDirConfig
from megatron_tip.data.config import DataConfig
from megatron_tip.eval.config import EvalConfig
from megatron_tip.models.config import ModelConfig, TeacherConfig
from megatron_tip.rollout.config import RolloutConfig
from megatron_tip.sections import LogConfig, OptimConfig, ParallelConfig, ScoringConfig, TrainConfig
from megatron_tip.selection.config import SelectionConfig
from megatron_tip.validation import short

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
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
        self.rollout.check_parallel(pipeline_parallel=self.parallel.pipeline_parallel,
                                    tensor_parallel=self.parallel.tensor_parallel)
        if self.teacher.recompute_granularity != "none":
            raise ValueError("teacher.recompute_granularity: the teacher runs without gradients and keeps no "
                             "activations; activation recomputation applies to the student only")
        longest = self.data.max_prompt_len + self.rollout.max_new_tokens
        if 0 < self.train.max_tokens_per_microbatch < longest:  # one rollout must fit a micro-batch
            raise ValueError(f"train.max_tokens_per_microbatch={self.train.max_tokens_per_microbatch} is smaller than "
                             f"the longest allowed sequence data.max_prompt_len + rollout.max_new_tokens = {longest}")
        if self.train.packing == "thd" and not self.train.max_tokens_per_microbatch:
            raise ValueError("train.packing=thd packs rollouts by token budget: set train.max_tokens_per_microbatch > 0")
        if self.optim.warmup_steps and self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than "
                             f"train.steps={self.train.steps} (for a short smoke test such as train.steps=1, "
                             f"also set optim.warmup_steps=0)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None or value == "null" else _coerce(value, args[0], key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = load_yaml(value, where=f"config key {key!r}")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {short(value)}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r}: expected true/false, got {short(value)}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {short(value)}")
        try:
            out = tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {short(value)}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"config key {key!r}: expected int, got {short(value)}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):  # str() of a list or mapping is not what was meant
            raise ValueError(f"config key {key!r}: expected a string, got {_kind(value)} {short(value)}")
        return str(value)
    return value


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'!r} must be a mapping, got {short(data)}")
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
    try:
        node[parts[-1]] = load_yaml(value, where=f"override {key}") if value != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None


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


# A config has ~100 YAML nodes; aliases may repeat a section, but the tree they expand to stays
# small. A "billion laughs" document expands 9^9-fold: refuse it before anything walks it.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES nodes (or recurse)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _expanded_size(node, {}, self.where)
        return super().construct_document(node)


def _expanded_size(node: yaml.Node, memo: dict[int, int], where: str) -> int:
    """Nodes of ``node`` with every alias expanded (memoized: linear in the document, not in the expansion)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise ValueError(f"{where}: a YAML alias refers to itself (a recursive structure)")
        return memo[key]
    memo[key] = -1
    children = (node.value if isinstance(node, yaml.SequenceNode) else
                [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else [])
    total = 1 + sum(_expanded_size(c, memo, where) for c in children)
    if total > MAX_YAML_NODES:
        raise ValueError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); "
                         f"write the values out")
    memo[key] = total
    return total


def load_yaml(text: str, *, where: str) -> Any:
    """``yaml.safe_load`` with the expansion of aliases bounded; ValueError naming ``where`` otherwise."""
    loader = _BoundedLoader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    except RecursionError:
        raise ValueError(f"{where}: YAML nested too deeply to read") from None
    finally:
        loader.dispose()


def _read_yaml(p: Path) -> dict[str, Any]:
    """The config file as a mapping of sections; ValueError naming the file, line and problem."""
    try:
        tree = load_yaml(p.read_text(encoding="utf-8"), where=str(p))
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
