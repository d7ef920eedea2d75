"""Peak GPU memory from the driver, tried against a stand-in nvidia-smi."""

import os

from conformance.bench.device_memory import PeakSampler, gpus_used_mb, process_memory_mb


def _fake_smi(tmp_path, per_process: str, per_gpu: str = "exit 9") -> str:
    """A stand-in that answers the per-process and the per-GPU query with shell snippets."""
    script = tmp_path / "nvidia-smi"
    script.write_text(f'#!/bin/sh\ncase "$1" in\n--query-gpu=*) {per_gpu} ;;\n*) {per_process} ;;\nesac\n')
    script.chmod(0o755)
    return str(script)


def test_sums_this_process_over_gpus_and_ignores_others(tmp_path):
    smi = _fake_smi(tmp_path, "echo '999999, 4000'; echo '1234, 300'; echo '1234, 200'; echo '77, [N/A]'")
    assert process_memory_mb(1234, smi) == 500
    assert process_memory_mb(4321, smi) is None  # not listed
    assert process_memory_mb(77, smi) is None  # unreadable figure


def test_unknown_when_the_tool_fails_or_is_missing(tmp_path):
    failing = _fake_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9")
    assert process_memory_mb(1, failing) is None and gpus_used_mb(failing) is None
    assert process_memory_mb(1, str(tmp_path / "absent")) is None
    assert gpus_used_mb(_fake_smi(tmp_path, "true", "echo '[N/A]'")) is None


def _counter_smi(tmp_path, values: list[int], line: str, per_gpu_line: str = "") -> str:
    """Each call prints the next of ``values`` (the last one repeats) in ``line``."""
    counter = tmp_path / "n"
    counter.write_text("0")
    cases = " ".join(f"{i}) v={v};;" for i, v in enumerate(values[:-1])) + f" *) v={values[-1]};;"
    step = f"n=$(cat {counter}); echo $((n+1)) > {counter}.new; mv {counter}.new {counter}; case $n in {cases} esac"
    return _fake_smi(tmp_path, f"{step}; {line}", f"{step}; {per_gpu_line}" if per_gpu_line else "exit 9")


def test_sampler_keeps_the_largest_reading_of_this_process(tmp_path):
    smi = _counter_smi(tmp_path, [100, 300, 200], f'echo "{os.getpid()}, $v"')
    with PeakSampler(interval=0.01, smi=smi) as sampler:
        pass
    sampler.sample()
    assert sampler.peak_mb == 300  # readings: 100 on entry, 300 on exit, then 200


def test_unlisted_process_gets_the_rise_of_the_gpus_used_memory(tmp_path):
    # a container: the driver lists a host pid; the GPUs held 1000 MiB before the path
    smi = _counter_smi(tmp_path, [1000, 1000, 1800, 1500], "echo '999999, 1'", "echo $v")
    with PeakSampler(interval=60, smi=smi) as sampler:  # baseline, then one reading on entry
        pass  # one on exit
    assert sampler.peak_mb == 800


def test_sampler_without_the_tool_reports_none(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with PeakSampler() as sampler:
        pass
    sampler.sample()
    assert sampler.peak_mb is None
