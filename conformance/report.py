"""Reports of a conformance run: the terminal table, report.json, junit.xml, report.md,
and the obtained tensors of every failing path (``obtained/<case>/<path>.npz``).

Files are written to a temporary name in the report folder and renamed into place, so a
full disk or a killed run never leaves a partial report.json behind.
"""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from conformance.files import FileProblem, atomic_output, write_files_together
from conformance.results import ERROR, FAIL, PASS, UNAVAILABLE, PathResult, RunResult
from conformance.text import aligned

ReportError = FileProblem  # the report folder cannot be written


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


SYMBOLS = {PASS: "+", FAIL: "X", ERROR: "E", UNAVAILABLE: "-"}
LEGEND = "+ pass   X fail   E error   - unavailable   (blank: not run)"
MATRIX_WIDTH = 100  # wider than this, and the case columns are numbered with a key


def _paths_in_order(result: RunResult) -> list[str]:
    return list(dict.fromkeys(p.name for c in result.cases for p in c.paths))


def matrix(result: RunResult) -> list[str]:
    """One row per path, one column per case, one symbol per cell (a run has many more
    paths than cases), then the legend."""
    names = _paths_in_order(result)
    cells = {(c.name, p.name): SYMBOLS.get(p.status, "?") for c in result.cases for p in c.paths}
    heads = [c.name for c in result.cases]
    width = max((len(n) for n in names), default=4) + sum(len(h) + 2 for h in heads)
    key = []
    if width > MATRIX_WIDTH:
        key = ["cases: " + ", ".join(f"{i} {h}" for i, h in enumerate(heads, 1))]
        heads = [str(i) for i in range(1, len(heads) + 1)]
    rows = [("path", *heads)]
    rows += [(name, *(cells.get((c.name, name), " ") for c in result.cases)) for name in names]
    return [*aligned(rows), *key, LEGEND]


def unavailable_reasons(result: RunResult) -> list[str]:
    """Each distinct reason once, with the paths it covers (and the cases, where not all)."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for case in result.cases:
        for p in case.paths:
            if p.status == UNAVAILABLE:
                by_reason.setdefault(p.reason, {}).setdefault(p.name, []).append(case.name)
    every = [c.name for c in result.cases]
    lines = []
    for reason, paths in by_reason.items():
        covered = [name if cases == every else f"{name} ({', '.join(cases)})" for name, cases in paths.items()]
        lines += [
            f"- {reason}",
            *textwrap.wrap(
                ", ".join(covered), 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
            ),
        ]
    return lines


def _why(p: PathResult) -> str:
    """A path's reason, with the smallest tolerance that would have passed each failing tap
    where the comparison knows it."""
    needed = [f"{t.name} atol {t.required_atol:.3g}" for t in p.tensors if not t and t.required_atol is not None]
    return p.reason + (f" (would pass at {', '.join(needed)})" if needed else "")


def _note(case: str, p: PathResult) -> str:
    return f"{case} {p.name}: {p.status}: {_why(p)}"


def _rows(result: RunResult, verbose: bool) -> list[tuple[str, ...]]:
    """The per-(case, path) table (and per tap with ``verbose``)."""
    rows = [("case", "path", "status", "worst tap", "max abs", "max rel", "time (s)")]
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
    return rows


def summary(result: RunResult) -> str:
    counts: dict[str, int] = {}
    for case in result.cases:
        for p in case.paths:
            counts[p.status] = counts.get(p.status, 0) + 1
    seconds = sum(p.seconds or 0 for c in result.cases for p in c.paths)
    text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    swept = sum(1 for c in result.cases for p in c.paths if p.sweep)
    sweep = f"; every table row read on {swept} (case, path) pairs" if swept else ""
    return f"{'OK' if result.ok else 'FAILED'}: {text} (the paths' own time: {seconds:.1f} s){sweep}"


def table(result: RunResult, verbose: bool = False) -> str:
    """What the terminal shows: the matrix, the unavailable reasons grouped, one line per
    failing or erroring path, the summary; ``verbose`` adds the per-(case, path) and per-tap
    rows and every path's reason."""
    blocks = matrix(result)
    reasons = unavailable_reasons(result)
    if reasons:
        blocks += ["", "unavailable here:", *reasons]
    if verbose:
        blocks += ["", *aligned(_rows(result, verbose=True))]
    notes = [
        _note(case.name, p)
        for case in result.cases
        for p in case.paths
        if p.status in (FAIL, ERROR) or (verbose and p.reason and p.status != UNAVAILABLE)
    ]
    if notes:
        blocks += ["", *notes]
    return "\n".join([*blocks, "", summary(result)])


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold (control characters, from a reason a
    runtime or a merged report wrote) shown as ``\\xNN`` escapes instead of breaking the file."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def junit(result: RunResult) -> bytes:
    suites = ET.Element("testsuites", name="pkm-conformance")
    for case in result.cases:
        failures = sum(p.status == FAIL for p in case.paths)
        errors = sum(p.status == ERROR for p in case.paths)
        skipped = sum(p.status == UNAVAILABLE for p in case.paths)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=_xml(case.name),
            tests=str(len(case.paths)),
            failures=str(failures),
            errors=str(errors),
            skipped=str(skipped),
        )
        for p in case.paths:
            tc = ET.SubElement(
                suite, "testcase", classname=_xml(case.name), name=_xml(p.name), time=f"{p.seconds or 0:.3f}"
            )
            reason = _xml(p.reason)
            if p.status == FAIL:
                ET.SubElement(tc, "failure", message=reason[:500]).text = reason
            elif p.status == ERROR:
                ET.SubElement(tc, "error", message=reason[:500]).text = reason
            elif p.status == UNAVAILABLE:
                ET.SubElement(tc, "skipped", message=reason[:500])
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


def coverage(result: RunResult) -> list[str]:
    """What the verdicts saw of each case's value tables: the rows its golden batch selects,
    beside the paths whose table sweep read every row (and those that could not)."""
    lines = ["## Coverage of the value tables", ""]
    lines += [
        "| case | rows | golden batch selects | swept: every row read | rows differing | not swept "
        "| ONNX files audited | differing |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for case in result.cases:
        cov = case.coverage or {}
        rows, selected = cov.get("rows"), cov.get("rows_selected")
        share = f"{selected:,} ({selected / rows:.2%})" if rows and selected is not None else "-"
        swept = [p for p in case.paths if p.sweep]
        full = sum(1 for p in swept if all(t.rows_read == t.rows for t in p.sweep))
        differing = sum(t.rows_differing for p in swept for t in p.sweep)
        not_swept = sum(1 for p in case.paths if p.sweep_reason and not p.sweep)
        audits = [p.audit for p in case.paths if p.audit is not None]
        audited = f"{len(audits)} paths | {sum(1 for a in audits if not a)}"
        table = f"{rows:,}" if rows else "-"
        lines.append(
            f"| {case.name} | {table} | {share} | {full} paths (100%) | {differing:,} | {not_swept} paths | {audited} |"
        )
    why = sorted({(p.name, p.sweep_reason) for c in result.cases for p in c.paths if p.sweep_reason and not p.sweep})
    if why:
        lines += ["", "Not swept:", *(f"- {name}: {reason}" for name, reason in dict(why).items())]
    return lines


def streams(result: RunResult, folder: Path | None = None) -> list[str]:
    """The token streams: per (case, path) tokens, agreement, the output's error quantiles,
    wrong selections and speed; with ``folder``, each path's error distribution as a PNG."""
    rows = [(c, p) for c in result.cases for p in c.paths if p.stream and "tokens" in p.stream]
    if not rows:
        return []
    lines = ["## Token streams", ""]
    lines += [
        "| case | path | tokens | selection agreement | ambiguous | wrong selections | output p50 | p99 | p99.9 | max "
        "| tokens/s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pictures = []
    for case, p in rows:
        st = p.stream
        outputs = [t for t in st["quantiles"] if t.rpartition("/")[2] == "output"]
        q = st["quantiles"][outputs[-1]] if outputs else {}
        verdict = st["failure"].replace("|", "\\|") if st.get("failure") else "pass"
        speed = f"{st['tokens_per_second']:,.0f}" if st.get("tokens_per_second") else "-"
        lines.append(
            f"| {case.name} | {p.name} | {st['tokens']:,} | {_pct(st.get('agreement'))} "
            f"| {_pct(st.get('ambiguous_rate'))} | {st['wrong_selections']} | {_num(q.get('p50'))} "
            f"| {_num(q.get('p99'))} | {_num(q.get('p999'))} | {_num(q.get('max'))} | {speed} | {verdict} |"
        )
        if folder is not None and st.get("histograms"):
            png = folder / f"stream-{_safe(case.name)}-{_safe(p.name)}.png"
            if _stream_picture(png, case.name, p):
                pictures.append(f"### {case.name} / {p.name}\n\n![stream error distribution]({png.name})\n")
    if pictures:
        lines += ["", "### Error distributions over the streams", "", *pictures]
    return lines


def _stream_picture(path: Path, case: str, p: PathResult) -> bool:
    """The absolute error of every float tap over the stream, one step line a tap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from conformance.stream import histogram_edges

    edges = histogram_edges()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for tap, counts in p.stream["histograms"].items():
        counts = np.asarray(counts)
        if counts[1:].sum() == 0:
            continue
        ax.step(edges, counts[1:], where="post", label=tap)
    if not ax.lines:  # every error zero: the reference itself
        plt.close(fig)
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("absolute error against the live reference")
    ax.set_ylabel("elements")
    ax.set_title(f"{case} / {p.name}: {p.stream['tokens']:,} tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return True


def markdown(result: RunResult, folder: Path) -> bytes:
    lines = [f"# Conformance report: {'OK' if result.ok else 'FAILED'}", ""]
    env = result.environment
    lines += [f"- {k}: {v}" for k, v in env.get("versions", {}).items()]
    lines += [f"- providers: {env.get('providers')}", f"- cpu: {env.get('cpu')}", f"- gpu: {env.get('gpu')}", ""]
    names = _paths_in_order(result)
    cells = {(c.name, p.name): SYMBOLS.get(p.status, "?") for c in result.cases for p in c.paths}
    lines += ["| path | " + " | ".join(c.name for c in result.cases) + " |", "|---" * (len(result.cases) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(cells.get((c.name, n), " ") for c in result.cases) + " |" for n in names]
    lines += ["", f"`{LEGEND}`", "", summary(result), "", *coverage(result), "", *streams(result, folder), ""]
    reasons = unavailable_reasons(result)
    if reasons:
        lines += ["## Unavailable here", "", *(r.strip() if r.startswith(" ") else r for r in reasons), ""]
    ran = [(c, p) for c in result.cases for p in c.paths if p.status != UNAVAILABLE]
    if ran:
        lines += ["## Every path that ran", ""]
        lines += ["| case | path | status | first divergence | reason |", "|---|---|---|---|---|"]
        for case, p in ran:
            reason = _why(p).replace("|", "\\|").replace("\n", " ")
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
