"""What every result row carries about the machine and software that produced it."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, str]:
    """Device, driver, library versions, repository commit and date (UTC) of this run."""
    driver = "n/a"
    if device.type == "cuda":
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "driver": driver,
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda": str(torch.version.cuda),
        "cudnn": str(cudnn),
        "python": platform.python_version(),
        "cpu_count": str(os.cpu_count()),
        # Other jobs on the machine make CPU timings noisy: record how busy it was when the run started.
        "load_avg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent),
    }


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), so bf16 autocast is worth timing."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
