"""Reproducibility across x86 machines: ``runtime.cpu_kernels: avx2`` gives the bytes an AVX2-only machine gives.

Other machines are played on this one by forcing the instruction set each library may use (ATen, oneDNN,
MKL read these variables at their first use), in new processes running the real training and scoring code
(``tests/kernel_probe.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

AVX2_ONLY_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS")


def probe(kernels: str, machine: dict[str, str]) -> tuple[str, str]:
    """(ATen capability, digest) of the probe with ``runtime.cpu_kernels: kernels`` on ``machine``."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES} | machine | {"OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-m", "tests.kernel_probe", kernels],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    capability, digest = out.stdout.split()[-2:]
    return capability, digest


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not {"avx2", "avx512f"} <= cpu_flags(), reason="needs an AVX-512 CPU to play two machines")
def test_avx2_kernels_give_an_avx2_only_machines_bytes():
    pinned = probe("avx2", {})  # this machine (AVX-512), pinned
    avx2_machine = probe("native", AVX2_ONLY_MACHINE)  # a machine with AVX2 only, unpinned: its own kernels
    assert pinned[0] == avx2_machine[0] == "AVX2"
    # The same weights, maps and scores, to the bit. Unpinned, this machine's AVX-512 kernels give other low bits
    # (measured once: another digest), so this fails when the pin does not hold.
    assert pinned[1] == avx2_machine[1]
