"""The ``run`` config section: where a run writes and how it checkpoints and resumes (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_tip.validation import at_least, one_of

RESUME_MODES = ("false", "true", "auto")


@dataclass
class RunDirConfig:
    """The ``run`` config section: where a run writes and how it checkpoints and resumes.

    resume: false = start a new run (refused if out_dir holds another run, unless overwrite);
    true = continue this run from its newest complete checkpoint (error if there is none);
    auto = continue if out_dir holds a checkpoint of this run, else start (what schedulers use).
    """

    out_dir: str = "runs/default"
    resume: str = "false"
    overwrite: bool = False  # with resume=false: replace whatever run out_dir holds
    save_every: int = 0  # 0: save only at the end
    exit_interval: int = 0  # >0: checkpoint and exit after this many steps in this invocation

    def __post_init__(self) -> None:
        self.resume = str(self.resume).lower()
        one_of("resume", self.resume, RESUME_MODES)
        at_least("save_every", self.save_every, 0)
        at_least("exit_interval", self.exit_interval, 0)
        if not self.out_dir:
            raise ValueError("out_dir is empty: name the run directory")
