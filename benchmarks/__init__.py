"""Throughput scripts (see README.md here). Each names the machine its figures come from."""

import os
import platform


def machine() -> str:
    """The processor, CPU count and OS, in words."""
    name = platform.processor()
    if not name and os.path.exists("/proc/cpuinfo"):  # Linux leaves processor() empty
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{name or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"
