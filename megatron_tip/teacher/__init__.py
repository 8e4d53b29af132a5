"""The frozen teacher behind one interface (``Teacher``), in the student's layout or its own.

- ``base.Teacher``: what scoring, selection and the loss read (hidden states, output weight/logits).
- ``same_layout.SameLayoutTeacher``: a second GPTModel on the student's groups (the default).
- ``own_layout.OwnLayoutTeacher``: ``teacher.parallel`` TP x PP on its own process groups
  (``groups``), rows moved between layouts by ``exchange``; ``offload``: ``teacher.offload``.
- ``checks``: the resolved layout and its refusals; ``build.build_teacher``: the one constructor.

Names are imported on first use (PEP 562), so ``teacher.checks`` imports without torch or megatron.
"""
from megatron_tip.lazy_exports import lazy_exports

_EXPORTS = {"Teacher": "base", "build_teacher": "build", "check_teacher_layout": "checks",
            "check_teacher_source": "checks", "has_own_layout": "checks", "teacher_layout": "checks"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
