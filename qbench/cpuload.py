"""How busy the machine was while something was timed, from Linux's /proc counters.

Over a window (two :func:`sample` calls), from ``/proc/stat`` (all CPUs) and ``/proc/self/stat``
(this process, all its threads):

* ``own_cores``: CPU time this process used per second of wall time (2.0 = two cores busy);
* ``others_cores``: CPU time every other process used per second — the machine's busy time
  (user, nice, system, irq, softirq) minus ours;
* ``steal``: the fraction of the CPUs' time the hypervisor gave to other guests;
* ``loadavg``: the 1-minute load average at each end (it lags and counts our own threads too, so
  it is context, not evidence).

Where /proc is missing (macOS, Windows) :func:`sample` returns None and nothing is measured.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: int  # jiffies, all CPUs: user + nice + system + irq + softirq
    steal: int
    total: int  # jiffies, all CPUs, every state (guest time is inside user already)
    own: int  # jiffies of this process: utime + stime
    cpus: int
    loadavg: float | None


def _own_jiffies() -> int:
    # /proc/self/stat: the command name in parentheses may hold spaces; fields after it are fixed.
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def sample() -> CpuSample | None:
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        values = [int(v) for v in lines[0].split()[1:9]]
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        own = _own_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return CpuSample(time.monotonic(), user + nice + system + irq + softirq, steal, sum(values), own, cpus, load)


def between(a: CpuSample | None, b: CpuSample | None) -> dict | None:
    """What the machine did from ``a`` to ``b`` (see the module doc), or None if either is missing."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    wall = b.wall - a.wall
    own = (b.own - a.own) / _TICKS
    busy = (b.busy - a.busy) / _TICKS
    total = b.total - a.total
    return {
        "wall_s": round(wall, 3),
        "cpus": b.cpus,
        "own_cores": round(own / wall, 3),
        # counters tick at 1/_TICKS s, per CPU, so a short window can read a little below our own use
        "others_cores": round(max(0.0, busy - own) / wall, 3),
        "steal": round((b.steal - a.steal) / total, 4) if total > 0 else 0.0,
        "loadavg_before": a.loadavg,
        "loadavg_after": b.loadavg,
    }
