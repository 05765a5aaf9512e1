"""How many CPU threads a run uses: the physical cores this process may use, less those other work keeps busy."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (package, core) pairs of the allowed CPUs in
    /proc/cpuinfo (Linux); the logical CPU count elsewhere. Hyper-threads share a core's FPUs and caches,
    and a matrix-vector product gains nothing from them."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        allowed = None
    try:
        cores = set()
        for block in Path("/proc/cpuinfo").read_text().split("\n\n"):
            fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
            if "processor" in fields and (allowed is None or int(fields["processor"]) in allowed):
                cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return len(allowed) if allowed else os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS when set; else the physical cores this process may use, less those that other work
    keeps busy (the 1-minute load average), and at least 1. An OpenMP thread that has to wait for a core
    stalls every parallel op: on a 2-core machine with a load of 5, two threads made a decode step 3.5x
    slower than one (145 ms against 17 ms on the tiny model) and the sampler 20x slower (105 ms against 5)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = physical_cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
