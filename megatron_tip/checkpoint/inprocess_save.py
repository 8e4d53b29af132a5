"""megatron's ``torch_dist`` checkpoint format, written by threads of the saving process.

megatron-core 0.16.1's ``TorchDistSaveShardedStrategy`` writes even a synchronous save through
``FileSystemWriterAsync``: it forks one writer process per file bucket (``thread_count``, default
2) and, at the first save, spawns a multiprocessing Manager that stays alive to carry the writers'
results. Those processes outlive a trainer killed with -9 (orphans holding the run's files open,
found hung for hours), receive every signal sent to the job's process group (a Ctrl-C or a
``scancel --signal=USR1 JOB`` kills them and the save fails with ``BrokenPipeError``).
:func:`save_strategy` writes the same files from threads instead: no child process exists, so
nothing can be orphaned or signalled, on CPU and GPU alike (tensors are staged to host memory
first, as megatron's own synchronous path does). Each rank still writes its own files, so a node's
ranks write in parallel.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any


def save_strategy(thread_count: int = 2) -> Any:
    """A ``torch_dist`` save strategy for ``dist_checkpointing.save(sharded_strategy=...)``.

    The files and metadata are megatron's own (``FileSystemWriterAsync`` plans and serializes them);
    only where the bytes are written from changes.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    class _InProcessSave(TorchDistSaveShardedStrategy):
        def async_save(self, sharded_state_dict, checkpoint_dir):
            # The writer takes its results queue from this module global, creating a Manager
            # process when it is unset; an in-process queue serves a save run in this process.
            if filesystem_async._results_queue is None:
                filesystem_async._results_queue = queue.Queue()
            return super().async_save(sharded_state_dict, checkpoint_dir)

        def _get_save_and_finalize_callbacks(self, writer, save_state_dict_ret):
            request = super()._get_save_and_finalize_callbacks(writer, save_state_dict_ret)
            if request.async_fn is None:  # nothing to write on this rank
                return request
            transforms = [writer.transforms] if hasattr(writer, "transforms") else []
            return request._replace(async_fn=partial(_write_buckets, transforms, writer.use_msc))

    return _InProcessSave("torch_dist", 1, thread_count=thread_count)


def _write_buckets(transforms: list, use_msc: bool, rank: int, write_buckets: list, results: Any) -> None:
    """What ``write_preloaded_data_multiproc`` does, with one thread per bucket instead of a fork."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    local: queue.Queue = queue.Queue()
    count: queue.Queue = queue.Queue()  # the writer marks each bucket done on it (get + task_done)
    for i in range(len(write_buckets)):
        count.put(i)
    write = partial(FileSystemWriterAsync.write_preloaded_data, transforms, use_fsync=True,
                    results_queue=local, count_queue=count, **({"use_msc": use_msc} if use_msc else {}))
    with ThreadPoolExecutor(max_workers=len(write_buckets), thread_name_prefix="ckpt-writer") as pool:
        list(pool.map(lambda item: write(local_proc_idx=item[0], write_bucket=item[1]), enumerate(write_buckets)))
    out: dict | Exception = {}
    for _ in write_buckets:
        idx, res = local.get_nowait()
        if isinstance(res, Exception):
            out = res
            break
        out[idx] = res
    results.put(out)
