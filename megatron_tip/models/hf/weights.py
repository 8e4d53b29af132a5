"""Read and write HF checkpoints tensor by tensor.

Reading opens safetensors lazily (``safe_open``), so a rank loads only the tensors of its own
pipeline stage and holds one fused tensor at a time. Writing streams (name, tensor) pairs into
size-capped safetensors shards with an index, as ``save_pretrained`` does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch

from megatron_tip.models.hf.mapping import (
    all_names, check_hf_shape, expected_hf_shapes, from_te_names, fuse,
)
from megatron_tip.models.spec import ModelSpec

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class HFCheckpointReader:
    """Name -> tensor access to an HF checkpoint dir (safetensors, sharded or not; .bin too).

    Every shard file named by the index must exist (FileNotFoundError names the first missing).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {str(self.dir)!r} does not exist")
        self._handles: dict[str, object] = {}
        self._bins: dict[str, dict] = {}
        for index in (SAFE_INDEX, BIN_INDEX):
            if (self.dir / index).exists():
                self.weight_map = dict(json.loads((self.dir / index).read_text())["weight_map"])
                break
        else:
            single = [f for f in ("model.safetensors", "pytorch_model.bin") if (self.dir / f).exists()]
            if not single:
                raise FileNotFoundError(f"no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or "
                                        f"{BIN_INDEX} in {str(self.dir)!r}")
            self.weight_map = {n: single[0] for n in self._names_in(single[0])}
        for f in sorted(set(self.weight_map.values())):
            if not (self.dir / f).exists():
                raise FileNotFoundError(f"checkpoint shard {f!r} listed in the index is missing from "
                                        f"{str(self.dir)!r}")

    def _names_in(self, fname: str) -> list[str]:
        if fname.endswith(".safetensors"):
            return list(self._open(fname).keys())
        return list(self._bin(fname).keys())

    def _open(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.dir / fname), framework="pt", device="cpu")
        return self._handles[fname]

    def _bin(self, fname: str) -> dict:
        if fname not in self._bins:
            self._bins[fname] = torch.load(self.dir / fname, map_location="cpu", mmap=True,
                                           weights_only=True)
        return self._bins[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.weight_map[name]
        if f.endswith(".safetensors"):
            return tuple(self._open(f).get_slice(name).get_shape())
        return tuple(self._bin(f)[name].shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"HF checkpoint {str(self.dir)!r} lacks tensor {name!r}")
        f = self.weight_map[name]
        return self._open(f).get_tensor(name) if f.endswith(".safetensors") else self._bin(f)[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for n in self.weight_map:
            yield n, self.get(n)


def check_hf_checkpoint(reader: HFCheckpointReader, spec: ModelSpec) -> None:
    """Fail before any work: every tensor the config needs exists with the configured shape."""
    expected = expected_hf_shapes(spec)
    missing = [n for n in expected if n not in reader.weight_map]
    if missing:
        raise KeyError(f"HF checkpoint {str(reader.dir)!r} lacks tensor(s) {missing[:8]}")
    for n in expected:
        check_hf_shape(n, reader.shape(n), spec, expected)


class LazyCanonical(Mapping):
    """Canonical state dict view of an HF checkpoint: each lookup reads and fuses on demand."""

    def __init__(self, reader: HFCheckpointReader, spec: ModelSpec):
        self.reader, self.spec = reader, spec
        self._rules = {cname: (rule, hf) for rule, cname, hf in all_names(spec)}

    def __getitem__(self, name: str) -> torch.Tensor:
        rule, hf_names = self._rules[from_te_names(name)]
        return fuse(rule, [self.reader.get(n) for n in hf_names], self.spec)

    def __iter__(self):
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)


def load_hf_weights(model: torch.nn.Module, hf_dir: str | os.PathLike, *, spec: ModelSpec,
                    tp: int = 1, tp_rank: int = 0, layer_offset: int = 0) -> None:
    """Load an HF checkpoint into this rank's megatron model (TP shard, PP stage only).

    Reads only the tensors this stage needs, one canonical tensor at a time. Errors: missing
    shard file or tensor (named), shape mismatch between config and weights (tensor + shapes).
    """
    from megatron_tip.models.sharding import load_canonical_state_dict

    reader = HFCheckpointReader(hf_dir)
    check_hf_checkpoint(reader, spec)
    load_canonical_state_dict(model, LazyCanonical(reader, spec), tp=tp, tp_rank=tp_rank,
                              layer_offset=layer_offset, vocab_size=spec.vocab_size)


def save_hf_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | os.PathLike, *,
                        max_shard_bytes: int = 5 * 2**30, dtype: Optional[torch.dtype] = None,
                        progress: bool = False, total: Optional[int] = None) -> list[str]:
    """Write a stream of HF tensors as safetensors shards (+ index when more than one).

    Holds at most one shard in memory. Returns the written file names.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = tensors
    if progress:
        from tqdm import tqdm

        it = tqdm(tensors, total=total, desc="writing HF tensors", unit="tensor")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, written, weight_map, total_size = 0, [], {}, 0

    def flush() -> None:
        tmp = f"shard-{len(written):05d}.tmp"
        save_file(shards[-1], str(out / tmp), metadata={"format": "pt"})
        written.append((tmp, list(shards[-1])))
        shards[-1] = {}

    for name, t in it:
        t = t.detach().to(dtype or t.dtype).contiguous().clone()  # clone: own storage per tensor
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size += nbytes
        total_size += nbytes
    if shards[-1] or not written:
        flush()
    n = len(written)
    files = []
    for k, (tmp, names) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        files.append(final)
        weight_map.update({nm: final for nm in names})
    if n > 1:
        (out / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
    return files
