"""A subprocess whose peak memory the benchmarks report: wait4's rusage of the finished child, which plain Popen
throws away. The child's ru_maxrss includes what it inherited at fork, so the benchmark scripts that use this keep
their own process small (they import no torch); starqa.eval.poc_report measures the child's own VmHWM instead."""

from __future__ import annotations

import os
import subprocess


class PeakPopen(subprocess.Popen):
    peak_rss = 0  # bytes, once the child has been waited for

    def _try_wait(self, wait_flags):
        pid, status, usage = os.wait4(self.pid, wait_flags)
        if pid:
            self.peak_rss = usage.ru_maxrss * 1024
        return pid, status
