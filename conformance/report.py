"""Reports of a conformance run: the terminal table, report.json, junit.xml, report.md,
and the obtained tensors of every failing path (``obtained/<case>/<path>.npz``).

Files are written to a temporary name in the report folder and renamed into place, so a
full disk or a killed run never leaves a partial report.json behind.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from conformance.files import FileProblem, atomic_output, write_files_together
from conformance.results import ERROR, FAIL, UNAVAILABLE, PathResult, RunResult

ReportError = FileProblem  # the report folder cannot be written


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def table(result: RunResult, verbose: bool = False) -> str:
    header = ("case", "path", "status", "worst tap", "max abs", "max rel", "time (s)")
    rows: list[tuple[str, ...]] = []
    for case in result.cases:
        for p in case.paths:
            worst = p.worst
            rows.append(
                (
                    case.name,
                    p.name,
                    p.status,
                    worst.name if worst else "-",
                    _fmt(worst.max_abs if worst else None),
                    _fmt(worst.max_rel if worst else None),
                    "-" if p.seconds is None else f"{p.seconds:.3f}",
                )
            )
            if verbose:
                for t in p.tensors:
                    amb = f" ({t.ambiguous_rows} ambiguous)" if t.ambiguous_rows else ""
                    rows.append(("", f"  {t.name}", t.status + amb, "", _fmt(t.max_abs), _fmt(t.max_rel), ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    notes = [
        f"{case.name} {p.name}: {p.status}: {p.reason}"
        for case in result.cases
        for p in case.paths
        if p.status in (FAIL, ERROR) or (verbose and p.reason)
    ]
    counts: dict[str, int] = {}
    for case in result.cases:
        for p in case.paths:
            counts[p.status] = counts.get(p.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    blocks = [*lines, "", *notes, *([""] if notes else []), f"{'OK' if result.ok else 'FAILED'}: {summary}"]
    return "\n".join(blocks)


def junit(result: RunResult) -> bytes:
    suites = ET.Element("testsuites", name="pkm-conformance")
    for case in result.cases:
        failures = sum(p.status == FAIL for p in case.paths)
        errors = sum(p.status == ERROR for p in case.paths)
        skipped = sum(p.status == UNAVAILABLE for p in case.paths)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=case.name,
            tests=str(len(case.paths)),
            failures=str(failures),
            errors=str(errors),
            skipped=str(skipped),
        )
        for p in case.paths:
            tc = ET.SubElement(suite, "testcase", classname=case.name, name=p.name, time=f"{p.seconds or 0:.3f}")
            if p.status == FAIL:
                ET.SubElement(tc, "failure", message=p.reason[:500]).text = p.reason
            elif p.status == ERROR:
                ET.SubElement(tc, "error", message=p.reason[:500]).text = p.reason
            elif p.status == UNAVAILABLE:
                ET.SubElement(tc, "skipped", message=p.reason[:500])
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def _histogram(path: Path, case: str, p: PathResult, tap: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    errors = p.errors[tap]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    positive = errors[errors > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
        ax.hist(positive, bins=bins)
        ax.set_xscale("log")
    tol = next(t for t in p.tensors if t.name == tap)
    if tol.atol:
        ax.axvline(tol.atol, color="red", linestyle="--", label=f"atol {tol.atol:g}")
        ax.legend()
    ax.set_title(f"{case} / {p.name} / {tap}: |obtained - golden|")
    ax.set_xlabel("absolute error")
    ax.set_ylabel("elements")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def markdown(result: RunResult, folder: Path) -> bytes:
    lines = [f"# Conformance report: {'OK' if result.ok else 'FAILED'}", ""]
    env = result.environment
    lines += [f"- {k}: {v}" for k, v in env.get("versions", {}).items()]
    lines += [f"- providers: {env.get('providers')}", f"- cpu: {env.get('cpu')}", f"- gpu: {env.get('gpu')}", ""]
    lines += ["| case | path | status | first divergence | reason |", "|---|---|---|---|---|"]
    for case in result.cases:
        for p in case.paths:
            reason = p.reason.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {case.name} | {p.name} | {p.status} | {p.first_divergence or ''} | {reason} |")
    precision = []
    for case in result.cases:
        for p in case.paths:
            figures = {t.name.rpartition("/")[2]: t.figures for t in p.tensors if t.figures}
            if figures:
                sel, out = figures.get("indices", {}), figures.get("output", {})
                bound = out.get("int8_bound_max")
                precision.append(
                    f"| {case.name} | {p.name} | {p.status} | {_pct(sel.get('selection_agreement'))} "
                    f"| {sel.get('ambiguous_rows', '-')} | {_num(out.get('output_rel_rms'))} "
                    f"| {_num(out.get('output_max_rel_rms'))} | {_num(bound)} |"
                )
    if precision:
        lines += ["", "## Reduced precision", ""]
        lines += [
            "| case | path | status | selection agreement | ambiguous rows | output error / RMS | max error / RMS "
            "| int8 bound (max) |",
            "|---|---|---|---|---|---|---|---|",
            *precision,
        ]
    worst = []
    for case in result.cases:
        for p in case.paths:
            for t in p.tensors:
                if t.worst_elements:
                    worst += [f"### {case.name} / {p.name} / {t.name}", "", t.message.replace("|", "\\|"), ""]
                    worst += ["| index | obtained | expected | difference |", "|---|---|---|---|"]
                    worst += [
                        f"| {e['index']} | {e['obtained']:.9g} | {e['expected']:.9g} | {e['difference']:.3g} |"
                        for e in t.worst_elements
                    ]
                    worst.append("")
    if worst:
        lines += ["", "## Worst elements of failing tensors", "", *worst]
    plots = []
    for case in result.cases:
        for p in case.paths:
            for tap in p.errors:
                safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{case.name}-{p.name}-{tap}")
                png = folder / f"{safe}.png"
                _histogram(png, case.name, p, tap)
                plots.append(f"### {case.name} / {p.name} / {tap}\n\n![error histogram]({png.name})\n")
    if plots:
        lines += ["", "## Error histograms of failing tensors", "", *plots]
    return ("\n".join(lines) + "\n").encode()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_@." else "_" for c in name)


def write_obtained(result: RunResult, folder: Path) -> list[Path]:
    """The obtained taps of every failing path: ``obtained/<case>/<path>.npz``, to diff
    against the golden's ``test_data_set_0/output_<k>.pb``."""
    import numpy as np

    written = []
    for case in result.cases:
        for p in case.paths:
            if p.obtained:
                target = folder / "obtained" / _safe(case.name) / f"{_safe(p.name)}.npz"
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(target) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **p.obtained)
                written.append(target)
    return written


def write_reports(result: RunResult, folder: Path) -> list[Path]:
    """report.json, junit.xml and report.md (with its PNGs), and the obtained tensors of
    failing paths: the three reports are written to temporary names first and renamed
    only when every one is complete, so a full disk leaves no partial or mismatched
    report behind."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        obtained = write_obtained(result, folder)
        payloads = {
            "report.json": (json.dumps(result.to_json(), indent=2) + "\n").encode(),
            "junit.xml": junit(result),
            "report.md": markdown(result, folder),
        }
        return write_files_together(folder, payloads) + obtained
    except (OSError, FileProblem) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ReportError(f"cannot write the report to {folder}: {why}") from exc
