"""Decide whether onnxruntime's CUDA provider can really run here, without onnxruntime logging an ERROR.

onnxruntime-gpu's ``get_available_providers()`` describes the build, not the machine: on a CPU-only host it
still lists CUDA, and asking for it logs an ERROR about missing CUDA libraries before silently falling back.
So we probe what the provider needs ourselves: the driver (libcuda) with at least one device, and the CUDA
provider library loading with its CUDA/cuDNN dependencies.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class GpuProbe:
    usable: bool
    detail: str  # one line saying why, for logs and health/info


def probe_cuda() -> GpuProbe:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return GpuProbe(False, "no NVIDIA driver (libcuda.so.1 not found)")
    if libcuda.cuInit(0) != 0:
        return GpuProbe(False, "NVIDIA driver present but cuInit failed")
    count = ctypes.c_int(0)
    if libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return GpuProbe(False, "NVIDIA driver present but no CUDA device")
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return GpuProbe(False, "onnxruntime not installed")
    try:
        import onnxruntime

        # pip-installed CUDA/cuDNN wheels (onnxruntime-gpu[cuda,cudnn]) are found only after preloading.
        preload = getattr(onnxruntime, "preload_dlls", None)
        if preload is not None:
            preload()
    except Exception as exc:  # noqa: BLE001 - any failure here means: not usable, say why
        return GpuProbe(False, f"onnxruntime CUDA preload failed: {exc}")
    provider_lib = Path(spec.origin).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        ctypes.CDLL(str(provider_lib))
    except OSError as exc:
        return GpuProbe(False, f"{count.value} CUDA device(s) but the CUDA provider cannot load: {exc}")
    return GpuProbe(True, f"{count.value} CUDA device(s); CUDA provider loads")


def choose_providers(prefer_gpu: bool = True) -> tuple[list[str], GpuProbe]:
    """Providers in preference order: CUDA first only when the probe says it can run."""
    probe = probe_cuda() if prefer_gpu else GpuProbe(False, "GPU disabled by configuration")
    providers = [CUDA_PROVIDER, CPU_PROVIDER] if probe.usable else [CPU_PROVIDER]
    return providers, probe
