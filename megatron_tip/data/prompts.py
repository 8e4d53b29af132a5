"""Prompt building: the tokenizer's chat template when it has one, else a plain-text template.

A model directory may ship ``prompt_template.txt`` (e.g. the toy models): a template with a
``{problem}`` field that reproduces the format the model was trained on, used verbatim.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Fields are substituted with str.replace, not str.format, so LaTeX braces need no escaping.
PLAIN_TEMPLATE = "Problem: {problem}\n{instruction}\nAnswer:"
TEMPLATE_FILE = "prompt_template.txt"


@dataclass(frozen=True)
class PromptFormat:
    """How problems become prompt text.

    ``template`` has a ``{problem}`` (and optionally ``{instruction}``) field, or ``None`` for the
    tokenizer's chat template. ``add_special_tokens`` says whether the tokenizer should add BOS
    when encoding the prompt (chat templates already write it).
    """

    template: str | None
    instruction: str = INSTRUCTION
    enable_thinking: bool | None = None

    @property
    def add_special_tokens(self) -> bool:
        return self.template is not None


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` defines a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(tokenizer, *, fmt: str = "auto", model_dir: str | Path | None = None,
                   instruction: str = INSTRUCTION, enable_thinking: bool | None = None) -> PromptFormat:
    """Pick a :class:`PromptFormat`.

    ``fmt``: ``auto`` (model's ``prompt_template.txt``, else chat template, else plain), ``chat``,
    ``plain``, or a literal template containing ``{problem}``.
    """
    if fmt == "auto":
        f = Path(model_dir) / TEMPLATE_FILE if model_dir is not None else None
        if f is not None and f.is_file():
            return PromptFormat(f.read_text(), instruction, enable_thinking)
        fmt = "chat" if has_chat_template(tokenizer) else "plain"
    if fmt == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("prompt format 'chat': the tokenizer has no chat template")
        return PromptFormat(None, instruction, enable_thinking)
    if fmt == "plain":
        return PromptFormat(PLAIN_TEMPLATE, instruction, enable_thinking)
    if "{problem}" not in fmt:
        raise ValueError(f"prompt format: expected auto/chat/plain or a template with {{problem}}, got {fmt!r}")
    return PromptFormat(fmt, instruction, enable_thinking)


def build_prompt(problem: str, *, tokenizer=None, fmt: PromptFormat | None = None) -> str:
    """Prompt text for one problem (default format: chat template if available, else plain)."""
    if fmt is None:
        fmt = PromptFormat(None if tokenizer is not None and has_chat_template(tokenizer) else PLAIN_TEMPLATE)
    if fmt.template is not None:
        return fmt.template.replace("{instruction}", fmt.instruction).replace("{problem}", problem)
    content = f"{problem}\n{fmt.instruction}" if fmt.instruction else problem
    kwargs = {} if fmt.enable_thinking is None else {"enable_thinking": fmt.enable_thinking}
    # Extra kwargs reach the Jinja template; templates that do not use enable_thinking ignore it.
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)
