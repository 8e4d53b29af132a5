"""Accelerator figures the planner computes with (vendor data sheets, dense bf16, SXM parts).

``memory_bytes`` is what ``nvidia-smi`` reports as total memory for the part (the whole HBM;
the CUDA context and libraries come out of it, see ``memory.RUNTIME_RESERVE``). Bandwidths are
per GPU and per direction. Achieved rates are the peak times the efficiency factors below,
which are assumptions (typical of large dense GEMMs and streaming kernels), not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30

# Assumed fraction of peak that each kind of work reaches (stated, not measured here).
EFFICIENCY = {
    "gemm": 0.45,  # model FLOP utilization of forward/backward GEMMs with Transformer Engine
    "hbm": 0.70,  # streaming kernels (token stats, optimizer, decode weight reads)
    "link": 0.70,  # NCCL collectives / PCIe copies vs the link's peak
}
# Eager decode: host launch overhead per transformer layer per generated token (assumed).
LAUNCH_OVERHEAD_S = {"megatron": 0.30e-3, "vllm": 0.10e-3}
COLLECTIVE_LATENCY_S = 15e-6  # one small NCCL all-reduce inside a node (assumed)
# vLLM with CUDA graphs (rollout.vllm_enforce_eager false): one graph replay plus the host's
# scheduling and sampling per decode step instead of a launch per layer (assumed, not measured).
GRAPH_STEP_OVERHEAD_S = 0.5e-3
VLLM_GRAPH_POOL_BYTES = 2**30  # memory of the captured graphs, out of the reservation (assumed)


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bf16_flops: float  # dense peak FLOP/s
    hbm_bytes_s: float
    nvlink_bytes_s: float  # per GPU, per direction, inside a node
    internode_bytes_s: float  # per GPU, per direction (one NIC per GPU)
    pcie_bytes_s: float  # host <-> device, per direction
    gpus_per_node: int = 8
    host_memory_bytes: int = 2 * 10**12  # per node (DGX H100/H200/A100: 2 TB), for teacher offload

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB


DEVICES: dict[str, Device] = {d.name: d for d in (
    # H100 SXM5 80 GB: 989 TFLOP/s bf16 dense, HBM3 3.35 TB/s, NVLink4 900 GB/s total (450/dir),
    # 400 Gb/s NDR InfiniBand per GPU, PCIe Gen5 x16; nvidia-smi total 81,559 MiB.
    Device("h100-80gb", 81559 * 2**20, 989e12, 3.35e12, 450e9, 50e9, 64e9),
    # H200 SXM 141 GB: same compute as H100, HBM3e 4.8 TB/s; nvidia-smi total 143,771 MiB.
    Device("h200-141gb", 143771 * 2**20, 989e12, 4.8e12, 450e9, 50e9, 64e9),
    # A100 SXM4 80 GB: 312 TFLOP/s bf16, HBM2e 2.04 TB/s, NVLink3 600 GB/s total (300/dir),
    # 200 Gb/s HDR InfiniBand per GPU, PCIe Gen4 x16; nvidia-smi total 81,920 MiB.
    Device("a100-80gb", 81920 * 2**20, 312e12, 2.039e12, 300e9, 25e9, 32e9),
)}


def device(name: str) -> Device:
    if name not in DEVICES:
        raise ValueError(f"--gpu {name!r}: known devices are {', '.join(DEVICES)}")
    return DEVICES[name]
