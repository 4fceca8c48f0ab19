"""Device memory readings: what the driver says, not only what the arena believes.

On CUDA the driver's view (nvidia-ml-py / NVML) includes other processes and the CUDA context, which
is what decides whether an arena of a given capacity fits; torch's counters say what this process's
caching allocator holds. Without NVML, `torch.cuda.mem_get_info` gives the driver's free/total. On the
CPU there is no device: the reading is the host's memory and this process's resident set.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["MemoryReading", "driver_info", "read_memory"]


@dataclass(slots=True)
class MemoryReading:
    device: str  # e.g. "cuda:0" or "cpu"
    source: str  # "nvml", "torch.cuda" or "host" (where total/used/free come from)
    total_bytes: int  # device (or host) memory
    used_bytes: int  # in use by everyone (NVML, torch.cuda) or by this process (host: RSS)
    free_bytes: int  # available
    torch_allocated: int  # bytes in live tensors of this process's caching allocator (CUDA only, else 0)
    torch_reserved: int  # bytes the caching allocator holds from the driver (CUDA only, else 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        gib = 2**30
        return (
            f"{self.device} ({self.source}): used {self.used_bytes / gib:.2f} of "
            f"{self.total_bytes / gib:.2f} GiB, free {self.free_bytes / gib:.2f} GiB; "
            f"torch allocated {self.torch_allocated / gib:.2f} GiB, "
            f"reserved {self.torch_reserved / gib:.2f} GiB"
        )


def _nvml_handle(index: int) -> Any:
    """NVML handle of torch's device `index`, matched by UUID so CUDA_VISIBLE_DEVICES cannot mislead."""
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def read_memory(device: str | torch.device) -> MemoryReading:
    """Memory of `device` from NVML when available, else torch's CUDA counters, else the host."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        allocated = torch.cuda.memory_allocated(index)
        reserved = torch.cuda.memory_reserved(index)
        try:
            import pynvml

            info = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(index))
            return MemoryReading(
                f"cuda:{index}", "nvml", int(info.total), int(info.used), int(info.free), allocated, reserved
            )
        except Exception:  # no nvidia-ml-py, or no NVML on this machine
            free, total = torch.cuda.mem_get_info(index)
            return MemoryReading(
                f"cuda:{index}", "torch.cuda", total, total - free, free, allocated, reserved
            )
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        total = free = 0
    rss = 0
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            rss = int(f.read().split()[1]) * page
    except OSError:
        pass
    return MemoryReading(str(dev), "host", total, rss, free, 0, 0)


def driver_info(device: str | torch.device) -> dict[str, Any]:
    """Card name, driver and CUDA versions for reports (what is known on this machine)."""
    dev = torch.device(device)
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev.type != "cuda":
        import platform

        info["card"] = platform.processor() or platform.machine()
        return info
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    info.update(
        card=props.name,
        memory_bytes=int(props.total_memory),
        cuda=torch.version.cuda,
        capability=f"{props.major}.{props.minor}",
    )
    try:
        import pynvml

        handle = _nvml_handle(index)
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        try:
            gen = pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)
            width = pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)
            info["pcie"] = f"Gen{gen} x{width}"
        except Exception:
            pass
    except Exception:
        info["driver"] = None
    return info
