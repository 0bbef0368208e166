"""pancls.machine: the one-line description of what a result was computed on."""
import platform

import torch

from pancls import machine


def test_cpu_description_names_model_architecture_and_threads(monkeypatch):
    monkeypatch.setattr(machine, "cpu_model", lambda: "Test CPU 9000")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert machine.describe("cpu") == f"cpu (Test CPU 9000, {platform.machine()}, 3 threads)"


def test_cpu_model_reads_cpuinfo_and_falls_back(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Fake Xeon 1234\nflags\t: avx\n")
    assert machine.cpu_model(cpuinfo) == "Fake Xeon 1234"
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    assert machine.cpu_model(tmp_path / "no_procfs") == "riscv64"
