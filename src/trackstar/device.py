"""Where tensors live: ``auto | cpu | cuda | cuda:N | mps``.

``auto`` takes the first CUDA device when this torch sees one, else the CPU;
MPS is used only when asked for (it has no float64, which R needs: R is then
accumulated on the CPU). Projection matrices are generated on the CPU from
their seeds and moved, so features agree across devices to float tolerance.
"""

from __future__ import annotations

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    """The requested device is not one this machine (or this torch build) has."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec``; a clear error for one that is not here."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"device={spec!r} is not a device; use {DEVICES}.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise DeviceError(f"device={spec!r}, but this torch ({torch.__version__}, {build}) sees no CUDA GPU. "
                              "Use device=auto (it falls back to the CPU) or device=cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device={spec!r}, but there are {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        return device
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"device={spec!r}, but MPS is not available here. Use device=auto or cpu.")
        return device
    raise DeviceError(f"device={spec!r} is not supported; use {DEVICES}.")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def float64_device(device: torch.device) -> torch.device:
    """Where float64 sums can run: ``device`` itself, or the CPU for MPS."""
    return torch.device("cpu") if device.type == "mps" else device


def check_model_dtype(dtype: str, device: torch.device) -> None:
    """Refuse a mixed-precision dtype the device cannot compute in."""
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"model_dtype=bfloat16, but {torch.cuda.get_device_name(device)} has no bfloat16 "
                          "support; use float16 (with care: see docs/real_data_and_scale.md) or float32.")
    if dtype == "bfloat16" and device.type == "mps" and not _mps_bf16():
        raise DeviceError("model_dtype=bfloat16 is not supported by MPS on this macOS; use float16 or float32.")


def _mps_bf16() -> bool:
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16)
        return True
    except (RuntimeError, TypeError):
        return False


#: The libraries whose versions can move a run's numbers (kernels, tokenizers, retrievers).
NUMERIC_PACKAGES = ("torch", "numpy", "scipy", "pandas", "transformers", "tokenizers", "safetensors", "bm25s",
                    "sentence-transformers", "faiss-cpu", "jax")  # bm25s takes jax's top-k where it is installed
#: numpy's SIMD levels, widest first: its sorts and partitions (BM25's and the dense
#: retriever's top-k) may order tied scores differently on each.
_NUMPY_SIMD = ("AVX512_SPR", "AVX512_ICL", "AVX512_SKX", "AVX512F", "AVX2", "AVX", "SSE42", "ASIMD", "NEON", "VSX")


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device | None = None) -> dict:
    """Where a run computed: the CPU and the instruction sets torch and numpy use there, the
    GPU if it ran on one, Python and the numeric libraries' versions. Numbers are the same
    bit for bit only between runs of the same code and environment: kernels and the order of
    tied scores differ between instruction sets and library versions."""
    import platform
    from importlib import metadata

    import numpy as np

    try:
        features = np._core._multiarray_umath.__cpu_features__
        simd = next((name for name in _NUMPY_SIMD if features.get(name)), "baseline")
    except AttributeError:  # numpy < 2 keeps it elsewhere
        simd = "unknown"
    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    env = {"cpu": _cpu_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "numpy_simd": simd,
           "machine": platform.machine(), "python": platform.python_version(), "packages": versions}
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env
