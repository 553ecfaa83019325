"""What gemma_tune runs on: the backend, its devices and the versions of the libraries that matter.

`environment(backend)` is the record (the run manifest's `backend`, `devices`, `python`, `platform`, `cpu`
(model name and a digest of its feature flags) and `packages`); `report(backend)` the lines `gemma-tune env`, the start of every run and the notebooks
print. Versions come from the installed distributions' metadata, so no backend but the active one is
imported; devices are those the active backend sees, each with its memory where the backend reports it
(an accelerator's total memory; for the CPU, the host's).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib import metadata

from gemma_tune.backend import deterministic_kernels

PACKAGES = ("gemma_tune", "keras", "keras-hub", "jax", "jaxlib", "tensorflow", "torch", "numpy", "datasets",
            "safetensors", "sentencepiece", "huggingface_hub", "kagglehub", "pydantic")
REPORTED = ("gemma_tune", "keras", "keras-hub", "jax", "jaxlib", "torch", "tensorflow")  # in `report`


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    return {name: v for name in PACKAGES if (v := version(name))}


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_model() -> str:
    """The host processor: its model name and a digest of its feature flags (/proc/cpuinfo on Linux: compilers
    such as XLA:CPU generate code for the features they find, so two CPUs of one name may not compute the same
    bits), else what `platform` knows."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    flags = hashlib.sha256(" ".join(sorted(fields.get("flags", "").split())).encode()).hexdigest()[:8]
    return f"{fields['model name']} (features {flags})"


def devices(backend: str) -> list[dict]:
    """[{kind: cpu|gpu|tpu, name, memory_bytes (None where unknown)}] for the devices `backend` sees; a CPU is
    named "cpu" on every backend (the processor itself is `cpu_model`)."""
    if backend == "jax":
        import jax

        found = []
        for d in jax.devices():
            stats = (d.memory_stats() or {}) if d.platform != "cpu" else {}
            found.append({"kind": d.platform, "name": "cpu" if d.platform == "cpu" else d.device_kind,
                          "memory_bytes": stats.get("bytes_limit") if d.platform != "cpu" else host_memory_bytes()})
        return found
    if backend == "torch":
        import torch

        gpus = [{"kind": "gpu", "name": torch.cuda.get_device_name(i),
                 "memory_bytes": torch.cuda.get_device_properties(i).total_memory}
                for i in range(torch.cuda.device_count())]
        return gpus or [{"kind": "cpu", "name": "cpu", "memory_bytes": host_memory_bytes()}]
    import tensorflow as tf

    found = []
    for d in tf.config.list_physical_devices():
        kind = d.device_type.lower()
        name = tf.config.experimental.get_device_details(d).get("device_name", d.name) if kind == "gpu" else d.name
        found.append({"kind": kind, "name": "cpu" if kind == "cpu" else name,
                      "memory_bytes": host_memory_bytes() if kind == "cpu" else None})
    return found


def environment(backend: str) -> dict:
    return {"backend": backend, "devices": devices(backend), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpu": cpu_model(), "packages": package_versions()}


def _gib(n: int | None) -> str:
    return "" if n is None else f", {n / 2 ** 30:.1f} GiB"


def report(backend: str, record: dict | None = None) -> list[str]:
    """Lines describing `record` (default: `environment(backend)`)."""
    record = record or environment(backend)
    packages = record["packages"]
    lines = [f"backend   {record['backend']} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND', 'unset')})"]
    lines += [f"device    {d['kind']}: {d['name']}{_gib(d['memory_bytes'])}" for d in record["devices"]]
    cores = os.cpu_count()
    lines.append(f"host      {record['platform']}, {record['cpu']} ({cores} cores), Python {record['python']}")
    lines.append("versions  " + ", ".join(f"{name} {packages[name]}" for name in REPORTED if name in packages))
    lines.append(f"kernels   deterministic {deterministic_kernels(record['backend'])} (train.deterministic)")
    from gemma_tune.distribute.hosts import job_line

    return lines + ([job_line()] if job_line() else [])
