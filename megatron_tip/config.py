"""Typed run configuration: YAML file + dotted command-line overrides.

Each section is a dataclass; a component owns its own config (selection's lives in
``megatron_tip.selection``). Unknown keys and wrongly typed values are errors naming the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_tip.selection import SelectionConfig


@dataclass
class ModelConfig:
    """Where a model's weights come from: an HF checkpoint dir or a megatron checkpoint dir."""

    path: str = ""
    dtype: str = "float32"  # params dtype: float32 | bfloat16

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: must be float32 or bfloat16")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


@dataclass
class DataConfig:
    """Prompts: a JSONL file with `problem` and `answer` fields."""

    prompts: str = ""
    # auto: the student's prompt_template.txt, else its chat template, else plain text;
    # chat | plain | a literal template containing {problem} (megatron_tip.eval.prompts)
    prompt_format: str = "auto"
    enable_thinking: Optional[bool] = None  # Qwen3 chat templates: thinking on/off
    max_prompt_len: int = 2048


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron | vllm
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    vllm_gpu_memory_utilization: float = 0.4

    def __post_init__(self) -> None:
        if self.engine not in ("megatron", "vllm"):
            raise ValueError(f"engine={self.engine!r}: must be megatron or vllm")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 10
    prompts_per_step: int = 8  # global batch of prompts (split over data-parallel ranks)
    micro_batch_size: int = 4  # sequences per forward in scoring and gradient passes
    seed: int = 1234
    out_dir: str = "runs/default"
    save_every: int = 0  # 0: save only at the end
    exit_interval: int = 0  # >0: checkpoint and exit after this many steps in this invocation
    resume: bool = False
    stats_chunk_size: Optional[int] = None  # token chunk inside the vocab-parallel ops (None: auto)
    score_chunk_tokens: int = 512  # scoring pass: logits rows materialized at a time
    vocab_size: Optional[int] = None  # shared true vocab; None: the tokenizer's length
    tensorboard: bool = True
    dump_token_stats: bool = False  # save the last step's per-token h / KL / mask (for plots)
    eval_prompts: str = ""  # optional held-out JSONL: student accuracy (greedy and T=1.0) before/after
    eval_limit: int = 64
    eval_before: bool = True  # also evaluate before training (sweeps skip the repeated baseline)


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

    def __post_init__(self) -> None:
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
        raise ValueError(f"config section {prefix or '<root>'!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
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
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: {e}") from None


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
        tree = yaml.safe_load(p.read_text()) or {}
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
        cfg.train.eval_prompts = _resolve(cfg.train.eval_prompts, base)
    return cfg


def _resolve(value: str, base: Path) -> str:
    if not value or Path(value).is_absolute() or Path(value).exists():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value
