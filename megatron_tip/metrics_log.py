"""Step metrics to a JSONL file, TensorBoard and a console progress bar (rank 0 only)."""
from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

_SHOWN = ("loss", "kept_ratio", "rollout_accuracy", "frac_q3", "peak_memory_gb")


@dataclass
class LogConfig:
    """The ``log`` config section."""

    tensorboard: bool = True
    dump_token_stats: bool = False  # save the last step's per-token h / KL / mask (for plots)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory of this process: CUDA allocator on GPU, max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricsLogger:
    """A fresh run starts a new file; a resumed run appends (the file is the run's history)."""

    def __init__(self, out_dir: str, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar: Optional[tqdm] = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / "metrics.jsonl"
        self.file = self.path.open("a" if start_step > 0 else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="opd", dynamic_ncols=True)

    def log(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        step = int(metrics.get("step", 0))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in _SHOWN if k in metrics})
        self.bar.update(1)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
