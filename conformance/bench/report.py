"""bench.json, bench.md (a table shaped like the seed README's) and bench.png."""

from __future__ import annotations

import json
from pathlib import Path

from conformance.bench.machine import summary
from conformance.files import FileProblem, atomic_output, atomic_write
from conformance.results import ERROR, OK
from conformance.text import aligned


def _row(r: dict, runs: int) -> list[str]:
    if r.get("status") != OK:
        return [r["name"], r.get("status", ERROR), "", "", "", "", "", "", "", r.get("reason", "")[:140]]
    ratio = r.get("ratio_to_torch_eager")
    return [
        r["name"],
        OK,
        f"{r['median_s'] * runs:.2f} s",
        f"{r['median_s'] * 1e3:.1f}",
        f"{r['p10_s'] * 1e3:.1f} / {r['p90_s'] * 1e3:.1f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['peak_host_mb']:,.0f}" + (f" / {r['peak_device_mb']:,.0f}" if r.get("peak_device_mb") else ""),
        "-" if ratio is None else f"{ratio:.2f}x",
        f"{100 * r['fraction_of_memory_bandwidth']:.1f}%",
        "",
    ]


HEADER = [
    "path",
    "status",
    "time ({runs} runs)",
    "median (ms)",
    "p10 / p90 (ms)",
    "tokens/s",
    "peak host / device MB",
    "vs torch eager",
    "of memory bandwidth",
    "reason",
]


def _runs(bench: dict) -> str:
    rounds = bench.get("rounds", 1)
    if rounds == 1:
        return f"{bench['runs']} timed runs"
    return f"{rounds} x {bench['runs']} timed runs ({rounds} rounds, paths taking turns)"


def table(bench: dict) -> list[list[str]]:
    runs = bench["runs"]
    header = [h.format(runs=runs) for h in HEADER]
    return [header, *(_row(r, runs) for r in bench["paths"])]


def sweep_table(bench: dict) -> list[tuple[str, ...]]:
    """The table sweep's time per path beside numpy reading the same tables once."""
    rows = [r for r in bench["paths"] if r.get("sweep")]
    if not rows:
        return []
    out = [("path", "table sweep", "numpy reads once", "ratio", "reference's bag sums", "rows", "verdict")]
    for r in rows:
        sw = r["sweep"]
        if "seconds" not in sw:
            out.append((r["name"], "-", "-", "-", "-", "-", f"not swept: {sw.get('reason', '')[:60]}"))
            continue
        reference_s = sw.get("reference_s") or 0.0
        out.append(
            (
                r["name"],
                f"{sw['seconds']:.3f} s",
                f"{sw['numpy_read_s']:.3f} s",
                f"{sw['ratio_to_numpy_read']:.1f}x" if sw.get("ratio_to_numpy_read") else "-",
                f"{reference_s:.3f} s (computed here)" if reference_s else "read, as stored",
                f"{sw['rows']:,}",
                "every row as expected" if sw["ok"] else "ROWS DIFFER",
            )
        )
    return out


def _sweep_markdown(bench: dict) -> list[str]:
    rows = sweep_table(bench)
    if not rows:
        return []
    return [
        "## Table sweep",
        "",
        "Every value row read through each path's own lookup, beside numpy reading the same tables once "
        "(in the same process, just before). The reference's bag sums, which every path's reads are "
        "compared with, are computed once for the case by its first path and read by the others; "
        "their time is not in the sweep's.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]),
        "",
    ]


def terminal(bench: dict) -> str:
    rows = table(bench)
    lines = aligned(rows)
    sweep = sweep_table(bench)
    return "\n".join(
        [
            f"bench preset {bench['preset']}: model {bench['model']}, input {tuple(bench['input_shape'])}, "
            f"{_runs(bench)} after {bench['warmup']} warm-up; memory copy bandwidth "
            f"{bench['memory_bandwidth_gb_per_s']:.1f} GB/s; value rows per pass "
            f"{bench['value_bytes_per_pass'] / 1e9:.3f} GB",
            *summary(bench["machine"]),
            *lines,
            *(["", "table sweep:", *aligned(sweep)] if sweep else []),
        ]
    )


def markdown(bench: dict) -> str:
    m = bench["machine"]
    rows = table(bench)
    out = [
        f"# Benchmark: preset `{bench['preset']}`",
        "",
        f"Model `{bench['model']}`, input {tuple(bench['input_shape'])}, median of {_runs(bench)} after "
        f"{bench['warmup']} warm-up, each path in its own process. Machine: {m.get('cpu')} ({m.get('cpu_count')} "
        f"CPUs), GPU: {m.get('gpu')}; memory copy bandwidth {bench['memory_bandwidth_gb_per_s']:.1f} GB/s. "
        f"Versions: {', '.join(f'{k} {v}' for k, v in m.get('versions', {}).items())}.",
        "",
        "## Machine",
        "",
        *(f"- {line}" for line in summary(m)),
        "",
        "## Paths",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]),
        "",
        *_sweep_markdown(bench),
        "![median time per pass](bench.png)",
        "",
    ]
    return "\n".join(out)


def chart(bench: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in bench["paths"] if r.get("status") == OK]
    ok.sort(key=lambda r: r["median_s"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(ok), 3) + 1))
    names = [r["name"] for r in ok]
    ax.barh(names, [r["median_s"] * 1e3 for r in ok], xerr=None, color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("median time per forward pass (ms)")
    ax.set_title(f"preset {bench['preset']}: input {tuple(bench['input_shape'])}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write(bench: dict, folder: Path) -> list[Path]:
    """bench.json, bench.md and bench.png, each written beside and renamed into place."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "bench.json", (json.dumps(bench, indent=2) + "\n").encode())
        atomic_write(folder / "bench.md", markdown(bench).encode())
        chart(bench, folder / "bench.png")
    except (OSError, FileProblem) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FileProblem(f"cannot write the benchmark report to {folder}: {why}") from exc
    return [folder / "bench.json", folder / "bench.md", folder / "bench.png"]
