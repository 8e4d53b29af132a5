"""Step metrics to a JSONL file, TensorBoard and a console progress bar (rank 0 only)."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron_tip.sections import LogConfig  # noqa: F401 (re-export: the section's old import path)

_SHOWN = ("loss", "kept_ratio", "rollout_accuracy")
_QUADRANTS = tuple(f"frac_q{i}" for i in range(1, 5))


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated memory of this process: CUDA allocator on GPU, max RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def rewind_metrics(path: Path, start_step: int) -> None:
    """Keep only the lines of steps before ``start_step`` (a resumed run redoes the later ones).

    Lines that are not a JSON object with a step (a write cut by a crash, bytes appended by
    something else) are dropped with one warning naming the file: the log is append-only, so what
    a crash can damage is its tail, and the steps it held are redone.
    """
    if not path.is_file():
        return
    kept, dropped = [], 0
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
            step = int(record.get("step", -1)) if isinstance(record, dict) else None
            if step is None:
                raise TypeError("not a JSON object")
        except (UnicodeDecodeError, ValueError, TypeError, RecursionError):
            dropped += bool(raw.strip())
            continue
        if step < start_step:
            kept.append(raw.decode("utf-8"))
    if dropped:
        print(f"warning: {path}: dropped {dropped} unreadable line(s) (a torn or damaged tail); "
              f"the steps they held are redone", flush=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows of a step: loss, kept ratio, rollout accuracy, the share of all
    positions in each quadrant Q1/Q2/Q3/Q4 (percent) and peak memory."""
    shown = {k: f"{metrics[k]:.4g}" for k in _SHOWN if k in metrics}
    if all(k in metrics for k in _QUADRANTS):
        shown["Q1/2/3/4%"] = "/".join(f"{100 * metrics[k]:.0f}" for k in _QUADRANTS)
    if "peak_memory_gb" in metrics:
        shown["peak_gb"] = f"{metrics['peak_memory_gb']:.3g}"
    return shown


def final_report(summary: dict, path: Path) -> str:
    """A few readable lines for the end of a run: steps, time, held-out before -> after, the files.

    ``summary`` is what ``summary.json`` (at ``path``) holds; the JSON itself stays in the file.
    """
    minutes, seconds = divmod(int(summary.get("time_s", 0)), 60)
    lines = [f"done: {summary.get('steps')} steps ({summary.get('skipped_steps', 0)} skipped), "
             f"{minutes}m{seconds:02d}s in this invocation; final loss {summary.get('final', {}).get('loss', float('nan')):.4g}"]
    ev = summary.get("eval", {})
    names = sorted({m for d in ev.values() for m in d if m.startswith("eval_acc_")})
    for m in names:
        before, after = ev.get("before", {}).get(m), ev.get("after", {}).get(m)
        cells = " -> ".join("?" if v is None else f"{100 * v:.1f}%" for v in (before, after))
        n = int(ev.get("after", ev.get("before", {})).get("eval_n", 0))
        tag = m.removeprefix("eval_acc_")
        label = "greedy" if tag == "greedy" else f"sampled at T={tag[1:]}"
        lines.append(f"held-out accuracy, {label} (n={n}): {cells}")
    out = Path(summary.get("out_dir", path.parent))
    lines.append(f"files: {path} (all numbers), {out / 'metrics.jsonl'}, {out / 'checkpoints'}")
    return "\n".join(lines)


class MetricsLogger:
    """A fresh run starts a new file; a resumed run continues it from the checkpoint's step.

    Steps logged after the checkpoint by the interrupted invocation are dropped from
    metrics.jsonl and purged from TensorBoard, so every step appears exactly once.
    """

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
        if start_step > 0:
            rewind_metrics(self.path, start_step)
        self.file = self.path.open("a" if start_step > 0 else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events at or after it that an interrupted invocation wrote.
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start_step or None)
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
        self.bar.set_postfix(progress_fields(metrics))
        self.bar.update(1)

    def write(self, line: str) -> None:
        """Print a line above the progress bar (a plain print would run into the bar's line)."""
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
