"""The export cache: one build per content, shared by processes, kept between runs."""

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

import conformance.export.cache as cache_module
from conformance.cases import load_cases
from conformance.export import ExportError, ExportUnsupported
from conformance.export.cache import ExportCache, key_material

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def tiny():
    return load_cases(REPO / "conformance" / "cases", ["tiny"])[0].spec


@pytest.fixture
def builds(monkeypatch):
    """Every export the cache builds, by exporter name (the real exporter runs)."""
    made = []
    real = cache_module.export

    def counted(spec, exporter, out_dir, **kwargs):
        made.append(exporter)
        return real(spec, exporter, out_dir, **kwargs)

    monkeypatch.setattr(cache_module, "export", counted)
    return made


def test_the_key_follows_the_content(tiny, tmp_path):
    same = key_material(tiny, "torch-fast")
    assert key_material(dataclasses.replace(tiny), "torch-fast") == same
    assert key_material(dataclasses.replace(tiny, seed=1), "torch-fast") != same
    assert key_material(tiny, "torch-fast@int8") != same
    weights = tiny.weights()
    np.savez(tmp_path / "a.npz", **weights)
    weights["values.weight"][0, 0] += 1
    np.savez(tmp_path / "b.npz", **weights)
    from_a = key_material(dataclasses.replace(tiny, weights_file=tmp_path / "a.npz"), "torch-fast")
    from_b = key_material(dataclasses.replace(tiny, weights_file=tmp_path / "b.npz"), "torch-fast")
    assert from_a != from_b and from_a != same  # one value changed: another export


def test_an_export_is_built_once_and_found_by_the_next_run(tiny, tmp_path, builds):
    first = ExportCache(tmp_path).export(tiny, "torch-fast")
    again = ExportCache(tmp_path).export(tiny, "torch-fast")  # another process, another run
    assert first == again and first.is_file() and builds == ["torch-fast"]
    assert (first.parent / "key.json").is_file()
    assert [p.name for p in (tmp_path / "exports").iterdir() if p.is_dir()] == [first.parent.name]


def test_two_workers_that_need_one_export_build_it_once(tiny, tmp_path, builds):
    got = []
    threads = [threading.Thread(target=lambda: got.append(ExportCache(tmp_path).export(tiny, "torch-fast")))]
    threads.append(threading.Thread(target=lambda: got.append(ExportCache(tmp_path).export(tiny, "torch-fast"))))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] == got[1] and builds == ["torch-fast"]


def test_a_refusal_is_kept_and_given_again_without_exporting(tiny, tmp_path, builds):
    """An exporter's refusal is a function of the key like an export: found out once (here
    the real refusal of a reduced-precision export by an exporter that makes none)."""
    with pytest.raises(ExportUnsupported, match="reduced-precision exports are made from") as first:
        ExportCache(tmp_path).export(tiny, "torch-script@int8")
    with pytest.raises(ExportUnsupported) as again:
        ExportCache(tmp_path).export(tiny, "torch-script@int8")  # another process, another run
    assert str(again.value) == str(first.value) and builds == ["torch-script@int8"]
    ExportCache(tmp_path).export(tiny, "torch-fast")  # another key: built
    assert builds == ["torch-script@int8", "torch-fast"]


def test_a_failed_build_leaves_no_entry(tiny, tmp_path, monkeypatch):
    def broken(spec, exporter, out_dir, **kwargs):
        (Path(out_dir) / f"{exporter}.onnx").write_bytes(b"half")
        raise ExportError("the exporter gave up")

    monkeypatch.setattr(cache_module, "export", broken)
    with pytest.raises(ExportError, match="gave up"):
        ExportCache(tmp_path).export(tiny, "torch-fast")
    assert [p for p in (tmp_path / "exports").iterdir() if not p.name.endswith(".lock")] == []


def test_an_entry_changed_after_its_build_is_refused_naming_it(tiny, tmp_path):
    """Copying one exporter's file over another's entry made that path pass on the wrong
    model; a planted refusal silently made a path unavailable."""
    cache = ExportCache(tmp_path)
    fast = cache.export(tiny, "torch-fast")
    script = cache.export(tiny, "torch-script")
    assert ExportCache(tmp_path).export(tiny, "torch-fast") == fast  # as built: used
    fast.write_bytes(script.read_bytes())  # another exporter's file over this entry's
    with pytest.raises(ExportError, match=r"torch-fast.onnx: not the file the export cache built .* remove the entry"):
        ExportCache(tmp_path).export(tiny, "torch-fast")
    data = bytearray(script.read_bytes())
    data[-1] ^= 1  # the same size, one bit
    script.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"torch-script.onnx: changed since the export cache built it"):
        ExportCache(tmp_path).export(tiny, "torch-script")


def test_a_planted_refusal_is_refused_not_obeyed(tiny, tmp_path):
    cache = ExportCache(tmp_path)
    fast = cache.export(tiny, "torch-fast")
    fast.with_suffix(".refused").write_text("torch-fast cannot export this model")
    with pytest.raises(ExportError, match=r"holds other files than it was built with \['torch-fast.refused'\]"):
        ExportCache(tmp_path).export(tiny, "torch-fast")
