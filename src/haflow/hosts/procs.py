"""Processes haflow started, referenced by PID *and* start time.

Nothing is ever signalled by name. Before any signal the PID's start time is compared with the
recorded one, so a PID reused by an unrelated process is never touched (design.md §7).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil

START_TIME_SLACK_S = 1.0  # supervisord reports whole-second spawn times


@dataclass(frozen=True)
class ProcRef:
    pid: int
    create_time: float
    label: str = ""

    @classmethod
    def of(cls, pid: int, label: str = "") -> "ProcRef | None":
        try:
            return cls(pid, psutil.Process(pid).create_time(), label)
        except psutil.Error:
            return None

    def process(self) -> psutil.Process | None:
        """The live process this ref names, or None if it died (zombies count as dead)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.create_time) > START_TIME_SLACK_S:
                return None
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None

    def send(self, sig: int) -> bool:
        if self.process() is None:
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill_group(self, sig: int = signal.SIGKILL) -> bool:
        """Signal the process group this process leads (it and the children it forked)."""
        p = self.process()
        if p is None:
            return False
        try:
            pgid = os.getpgid(self.pid)
            if pgid == self.pid:
                os.killpg(pgid, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def descendants(self) -> list["ProcRef"]:
        p = self.process()
        if p is None:
            return []
        out = []
        for c in p.children(recursive=True):
            try:
                out.append(ProcRef(c.pid, c.create_time(), f"{self.label} child"))
            except psutil.Error:
                continue
        return out


def wait_gone(refs: list[ProcRef], timeout: float) -> list[ProcRef]:
    """Wait until every ref has exited; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [r for r in refs if r.alive()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [r for r in alive if r.alive()]
    return alive
