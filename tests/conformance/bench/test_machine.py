"""The machine figures of the benchmark: present, sane, and read from the right places."""

import os

from conformance.bench.machine import FLAGS, cpu_info, first_touch, runtime_threads, summary

CPUINFO = """processor\t: 0
model name\t: Example CPU @ 2.0GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma avx512f amx_tile
processor\t: 1
model name\t: Example CPU @ 2.0GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse2 avx2 fma avx512f amx_tile
processor\t: 2
model name\t: Example CPU @ 2.0GHz
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse2 avx2 fma avx512f amx_tile
"""


def test_cpu_info_reads_model_flags_and_physical_cores():
    info = cpu_info(CPUINFO)
    assert info["cpu_model"] == "Example CPU @ 2.0GHz"
    assert info["cpu_flags"] == {f: f in ("avx2", "fma", "avx512f", "amx_tile") for f in FLAGS}
    assert info["physical_cores"] == 2  # two hyper-threads of core 0, one of core 1
    assert info["logical_cores"] == os.cpu_count() and 1 <= info["usable_cores"] <= os.cpu_count()


def test_cpu_info_without_cpuinfo_says_unknown():
    info = cpu_info("")
    assert info["cpu_model"] is None and info["cpu_flags"] is None and info["physical_cores"] is None
    assert "flags: unknown" in summary(info)[0]


def test_first_touch_of_a_fresh_buffer():
    touch = first_touch(64 << 20, repeats=3)
    assert touch["bytes"] == 64 << 20
    assert 0 < touch["rewrite_s"] < 1 and 0 < touch["first_touch_s"] < 2
    assert touch["first_touch_gb_per_s"] == (64 << 20) / touch["first_touch_s"] / 1e9


def test_runtime_threads_are_counted():
    import torch

    threads = runtime_threads()
    assert threads["torch_threads"] == torch.get_num_threads() >= 1
    assert 1 <= threads["onnxruntime_intra_op_threads"] <= os.cpu_count()
    assert threads["tensorflow_intra_op_threads"] >= 0 and threads["tensorflow_inter_op_threads"] >= 0
