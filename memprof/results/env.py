"""The environment a run measured on: host, GPU, library versions, git revision. No torch import."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

from memprof.errors import UserError

PACKAGES = ("memprof", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "schedulefree",
            "nvidia-ml-py", "pandas", "rich")
# variables that change how freed memory is kept, hence what the RSS and the allocator's peaks read: glibc's malloc
# (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576 makes a CPU cell's RSS follow its tensors), a preloaded
# allocator (jemalloc, tcmalloc), PyTorch's CUDA caching allocator
MEMORY_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_TOP_PAD_", "LD_PRELOAD", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def memory_bytes() -> int:
    """This host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def capture() -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "gpus": _gpus(),
        "versions": versions,
        "memory_env": {name: os.environ[name] for name in MEMORY_ENV if os.environ.get(name)},
        **_git(),
    }


def read_env(path: Path) -> dict[str, Any] | None:
    """A run's env.json (None when the folder has none).

    Raises:
        UserError: naming the file, when it is not JSON or not a JSON object.
    """
    if not path.exists():
        return None
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    if not isinstance(env, dict):
        raise UserError(str(path), "not a JSON object")
    return env


def machine_label(env: dict[str, Any]) -> str:
    """A short name of the device class, used to refuse comparing peaks across different GPUs."""
    gpus = env.get("gpus") or []
    return gpus[0]["name"] if gpus else f"cpu:{env.get('cpu', '?')}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nvml_cards() -> list[Any]:
    """NVML's handle of each card on the host, in NVML's order (which ``CUDA_VISIBLE_DEVICES`` does not change);
    none where NVML is absent or fails. Asks no CUDA runtime, so it is safe before forking."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return []


def _gpus() -> list[dict[str, Any]]:
    cards = nvml_cards()
    if not cards:
        return []
    import pynvml

    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        return [{"index": i, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                 "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), "driver": driver}
                for i, handle in enumerate(cards)]
    except Exception:  # noqa: BLE001 - a card NVML lists but cannot describe: nothing to report
        return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip() != ""
        return {"git_revision": rev, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_revision": None, "git_dirty": None}
