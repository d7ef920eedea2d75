"""bench.json files from several machines, side by side (``python -m conformance merge``).

Each machine keeps its own columns: median time per pass, its ratio to torch eager on the
same device, and the fraction of its own memory bandwidth. Ratios are only ever taken
within one machine; times of different machines stand side by side and are never divided.
Only benches of one preset, model and input shape merge.
"""

from __future__ import annotations

import json
from pathlib import Path

from conformance.merge import MergeError, machine_labels, write_together
from conformance.text import aligned

SAME = ("preset", "model", "input_shape")


def _check(source: Path, bench: dict) -> None:
    if "machines" in bench:
        raise MergeError(f"{source} is itself a merged bench: merge the machines' own bench.json files instead")
    paths = bench.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in paths):
        raise MergeError(f"{source}: not a bench.json ('paths' must be a list of named entries)")
    missing = [k for k in (*SAME, "runs") if k not in bench]
    if missing:
        raise MergeError(f"{source}: not a bench.json (no {missing})")
    number = (int, float)
    for r in paths:
        timed = r.get("status") != "ok" or isinstance(r.get("median_s"), number)
        extras = all(
            r.get(k) is None or isinstance(r[k], number)
            for k in ("ratio_to_torch_eager", "fraction_of_memory_bandwidth")
        )
        if not (timed and extras):
            raise MergeError(f"{source}: path {r['name']!r} is ok but its median_s, ratio or fraction is not a number")


def merge_benches(sources: list[Path], benches: list[dict]) -> dict:
    """The merged bench: one entry per path with one result per machine."""
    for source, bench in zip(sources, benches, strict=True):
        _check(source, bench)
    first = benches[0]
    for source, bench in zip(sources[1:], benches[1:], strict=True):
        differ = [k for k in SAME if bench[k] != first[k]]
        if differ:
            theirs = ", ".join(f"{k} {bench[k]!r} vs {first[k]!r}" for k in differ)
            raise MergeError(f"{source} benchmarks something else than {sources[0]} ({theirs}): only one preset merges")
    environments = [b.get("machine") if isinstance(b.get("machine"), dict) else {} for b in benches]
    labels = machine_labels(sources, environments)
    machines = [
        {
            "name": label,
            "report": str(source),
            "machine": env,
            "memory_bandwidth_gb_per_s": bench.get("memory_bandwidth_gb_per_s"),
            "runs": bench["runs"],
            "rounds": bench.get("rounds", 1),
            "warmup": bench.get("warmup"),
        }
        for label, source, env, bench in zip(labels, sources, environments, benches, strict=True)
    ]
    paths: dict[str, list[dict]] = {}
    for label, bench in zip(labels, benches, strict=True):
        for r in bench["paths"]:
            entry = {k: v for k, v in r.items() if k not in ("times_s", "name")}  # the raw passes stay in each file
            paths.setdefault(r["name"], []).append({"machine": label, **entry})
    ok = all(r.get("status") != "error" for results in paths.values() for r in results)
    return {
        "ok": ok,
        **{k: first[k] for k in SAME},
        "value_bytes_per_pass": first.get("value_bytes_per_pass"),
        "machines": machines,
        "paths": [{"name": name, "results": results} for name, results in paths.items()],
    }


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("status") != "ok":
        return result.get("status", "error")
    ms = result["median_s"] * 1e3
    text = f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"
    extras = []
    if result.get("ratio_to_torch_eager") is not None:
        extras.append(f"{result['ratio_to_torch_eager']:.2f}x")
    if result.get("fraction_of_memory_bandwidth") is not None:
        extras.append(f"{100 * result['fraction_of_memory_bandwidth']:.1f}% bw")
    return text + (f" ({', '.join(extras)})" if extras else "")


def table(merged: dict) -> list[list[str]]:
    """Header and one row per path: one column per machine."""
    names = [m["name"] for m in merged["machines"]]
    rows = [["path", *names]]
    for p in merged["paths"]:
        by_machine = {r["machine"]: r for r in p["results"]}
        rows.append([p["name"], *(_cell(by_machine.get(n)) for n in names)])
    return rows


NOTE = (
    "Median time per forward pass on each machine; in brackets, that machine's ratio to torch eager on the "
    "same device (above 1: faster) and the fraction of that machine's memory bandwidth the value-row reads "
    "reach. Ratios are within one machine only: different machines' times are side by side, not divided."
)


def terminal(merged: dict) -> str:
    rows = table(merged)
    lines = aligned(rows)
    head = f"bench preset {merged['preset']} merged from {len(merged['machines'])} machines: " + ", ".join(
        f"{m['name']} ({m['report']})" for m in merged["machines"]
    )
    reasons = [
        f"{p['name']} on {r['machine']}: {r.get('status')}: {r.get('reason', '')}"
        for p in merged["paths"]
        for r in p["results"]
        if r.get("status") == "error"
    ]
    return "\n".join([head, *lines, *([""] if reasons else []), *reasons])


def markdown(merged: dict) -> str:
    rows = table(merged)
    out = [
        f"# Benchmark: preset `{merged['preset']}` on {len(merged['machines'])} machines",
        "",
        f"Model `{merged['model']}`, input {tuple(merged['input_shape'])}.",
        "",
        "| machine | cpu | gpu | memory copy bandwidth | timed runs | report |",
        "|---|---|---|---|---|---|",
    ]
    for m in merged["machines"]:
        env, bw = m["machine"], m["memory_bandwidth_gb_per_s"]
        named = env.get("machine") if isinstance(env.get("machine"), dict) else {}
        cpu, gpu = named.get("cpu") or env.get("cpu"), named.get("gpu") or env.get("gpu")
        out.append(
            f"| {m['name']} | {cpu} | {gpu} | {'-' if bw is None else f'{bw:.1f} GB/s'} "
            f"| {m['rounds']} x {m['runs']} | {m['report']} |"
        )
    out += [
        "",
        NOTE,
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]),
        "",
    ]
    return "\n".join(out)


def write(merged: dict, folder: Path) -> list[Path]:
    """bench.json and bench.md of the merged benches."""
    return write_together(
        folder,
        {"bench.json": (json.dumps(merged, indent=2) + "\n").encode(), "bench.md": markdown(merged).encode()},
    )
