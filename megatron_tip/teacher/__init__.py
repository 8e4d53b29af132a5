"""The frozen teacher behind one interface (``Teacher``), in the student's layout or its own.

- ``base.Teacher``: what scoring, selection and the loss read (hidden states, output weight/logits).
- ``same_layout.SameLayoutTeacher``: a second GPTModel on the student's groups (the default).
- ``own_layout.OwnLayoutTeacher``: ``teacher.parallel`` TP x PP on its own process groups
  (``groups``), rows moved between layouts by ``exchange``.
- ``checks``: the resolved layout and its refusals; ``build.build_teacher``: the one constructor.
"""
from megatron_tip.teacher.base import Teacher
from megatron_tip.teacher.build import build_teacher
from megatron_tip.teacher.checks import check_teacher_layout, check_teacher_source, has_own_layout, teacher_layout

__all__ = ["Teacher", "build_teacher", "check_teacher_layout", "check_teacher_source", "has_own_layout",
           "teacher_layout"]
