"""Peak GPU memory from the driver's per-process list, tried against a stand-in nvidia-smi."""

import os
import time

from conformance.bench.device_memory import PeakSampler, process_memory_mb


def _fake_smi(tmp_path, body: str) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def test_sums_this_process_over_gpus_and_ignores_others(tmp_path):
    smi = _fake_smi(tmp_path, "echo '999999, 4000'\necho '1234, 300'\necho '1234, 200'\necho '77, [N/A]'")
    assert process_memory_mb(1234, smi) == 500
    assert process_memory_mb(4321, smi) is None  # not listed: no GPU memory
    assert process_memory_mb(77, smi) is None  # unreadable figure


def test_unknown_when_the_tool_fails_or_is_missing(tmp_path):
    assert process_memory_mb(1, _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed' ; exit 9")) is None
    assert process_memory_mb(1, str(tmp_path / "absent")) is None


def test_sampler_keeps_the_largest_reading(tmp_path, monkeypatch):
    # each call prints the next value from a counter: 100, 300, 200, 200, ...
    counter = tmp_path / "n"
    counter.write_text("0")
    smi = _fake_smi(
        tmp_path,
        f"n=$(cat {counter}); echo $((n+1)) > {counter}\n"
        f'case $n in 0) v=100;; 1) v=300;; *) v=200;; esac\necho "$PPID_OF_TEST, $v"',
    )
    monkeypatch.setenv("PPID_OF_TEST", str(os.getpid()))
    with PeakSampler(interval=0.01, smi=smi) as sampler:
        while int(counter.read_text()) < 4:
            time.sleep(0.01)
    assert sampler.peak_mb == 300


def test_sampler_without_the_tool_reports_none(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with PeakSampler() as sampler:
        pass
    assert sampler.peak_mb is None
