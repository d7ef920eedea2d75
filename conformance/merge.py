"""``python -m conformance merge``: one conformance matrix from the reports of several machines.

No machine runs every path (CI machines have no GPU, GPU machines often lack TensorRT), so
each runs what it can and the reports are merged:

- one row per (case, path), naming the machine(s) where it ran (from each report's
  ``environment.machine``); a path unavailable on one machine and run on another shows the
  run, and its ``machines`` list keeps every machine's status;
- the same (case, path) run on two machines with different verdicts (pass, fail, error) is a
  conflict: the row fails with every machine's verdict in its reason and the conflict is
  listed at the top, never resolved by picking one;
- ``fail`` because a ``--require``d path was unavailable on a machine counts as unavailable
  there: another machine's run of it stands (if none ran it, the failure stays);
- every report must have been made against the same goldens: each case entry carries the
  sha256 of its golden's case.json (which itself pins every golden file by sha256), and
  reports that differ for a case are refused. Reports written before that digest existed
  are refused too: their golden version cannot be checked, so rerun them.

bench.json files are merged by ``conformance.bench.merge`` through the same command (the
command line reads the files, which say which kind they are, and hands each kind to its
module; this module never imports the bench).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from conformance.cases import NAME as CASE_NAME
from conformance.files import FileProblem, write_files_together
from conformance.report import ReportError, junit
from conformance.results import CaseResult, PathResult, RunResult
from conformance.text import aligned
from pkm_models.errors import PKMError

RAN = ("pass", "fail", "error")
STATUSES = (*RAN, "unavailable")
REQUIRED_BUT_UNAVAILABLE = "required but unavailable: "


class MergeError(PKMError):
    """The files given cannot be merged: unreadable, not reports, or of different goldens."""


# --- reading -------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    """A JSON object from ``path``; MergeError naming the file when it is missing, truncated
    or not JSON."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MergeError(
            f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError:  # thousands of nested arrays: no report is made of those
        raise MergeError(f"{path}: nested too deeply to be a report") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise MergeError(f"{path}: not a report's JSON ({str(exc).split(';')[0]})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def kind(path: Path, data: dict) -> str:
    """``report`` (a conformance report.json) or ``bench`` (a bench.json)."""
    if "cases" in data:
        return "report"
    if "paths" in data and "preset" in data:
        return "bench"
    raise MergeError(f"{path} is neither a conformance report.json nor a bench.json (it has {sorted(data)[:8]})")


# what a path's names are made of (the registry's names, precision suffixes, [file:NAME]); a
# report from elsewhere is checked against it, and its case names against a case file's
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@\[\]-]*")


def _check_report(path: Path, data: dict) -> None:
    if "conflicts" in data:
        raise MergeError(f"{path} is itself a merged report: merge the machines' own reports instead")
    if not isinstance(data.get("environment"), dict) or not isinstance(data["cases"], list):
        raise MergeError(f"{path}: not a conformance report ('environment' must be an object, 'cases' a list)")
    for case in data["cases"]:
        if (
            not isinstance(case, dict)
            or not isinstance(case.get("name"), str)
            or not isinstance(case.get("paths"), list)
        ):
            raise MergeError(f"{path}: a case entry lacks its 'name' or 'paths'")
        if not CASE_NAME.fullmatch(case["name"]):
            raise MergeError(f"{path}: case name {case['name']!r} is not a plain name (letters, digits, '-_.')")
        golden = case.get("golden")
        if not isinstance(golden, dict) or not isinstance(golden.get("sha256"), str):
            raise MergeError(
                f"{path}: case {case['name']!r} has no golden digest: the report comes from a version that did "
                "not record it, so its golden version cannot be checked; rerun that machine"
            )
        for p in case["paths"]:
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or p.get("status") not in STATUSES:
                raise MergeError(f"{path}: case {case['name']!r} has a path entry without a name or a known status")
            if not _PATH_NAME.fullmatch(p["name"]):  # a newline or '|' would break every table it is printed in
                raise MergeError(f"{path}: case {case['name']!r}: {p['name']!r} is not an execution path's name")
            tensors, seconds = p.get("tensors", []), p.get("seconds")
            if (
                not isinstance(p.get("reason", ""), str)
                or not isinstance(tensors, list)
                or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tensors)
                or not (seconds is None or isinstance(seconds, int | float))
            ):
                raise MergeError(
                    f"{path}: case {case['name']!r}, path {p['name']!r}: malformed reason, tensors or seconds"
                )


def machine_label(environment: dict, fallback: str) -> str:
    """``host (GPU)`` or ``host (CPU model)``: the machine as a reader recognises it."""
    machine = environment.get("machine") if isinstance(environment.get("machine"), dict) else {}
    host = machine.get("hostname") or fallback
    device = machine.get("gpu") or environment.get("gpu") or machine.get("cpu") or environment.get("cpu")
    return f"{host} ({device})" if device else host


def machine_labels(sources: list[Path], environments: list[dict]) -> list[str]:
    """One label per report; reports with the same label but different environments are
    different machines and get a ``#2``, ``#3`` ... suffix."""
    labels, seen = [], {}  # label -> [environments]
    for source, env in zip(sources, environments, strict=True):
        label = machine_label(env, str(source))
        known = seen.setdefault(label, [])
        if env not in known:
            known.append(env)
        index = known.index(env)
        labels.append(label if index == 0 else f"{label} #{index + 1}")
    return labels


def _check_goldens(sources: list[Path], reports: list[dict]) -> None:
    by_case: dict[str, dict[str, list[str]]] = {}
    for source, report in zip(sources, reports, strict=True):
        for case in report["cases"]:
            by_case.setdefault(case["name"], {}).setdefault(case["golden"]["sha256"], []).append(str(source))
    differing = {name: digests for name, digests in by_case.items() if len(digests) > 1}
    if differing:
        name, digests = next(iter(differing.items()))
        which = "; ".join(f"{', '.join(files)}: {digest[:12]}" for digest, files in digests.items())
        raise MergeError(
            f"the reports were made against different goldens ({len(differing)} case(s) differ, "
            f"first {name!r}: {which}); run every machine on the same golden version and merge again"
        )


# --- merging -------------------------------------------------------------------------------
def _ran(p: dict) -> bool:
    return p["status"] in RAN and not (
        p["status"] == "fail" and p.get("reason", "").startswith(REQUIRED_BUT_UNAVAILABLE)
    )


def _merge_path(entries: list[tuple[str, dict]]) -> tuple[dict, dict | None]:
    """One (case, path) from every machine that reported it: the merged entry and the
    conflict, if any."""
    machines = [
        {
            "machine": m,
            "status": p["status"],
            "reason": p.get("reason", ""),
            "first_divergence": p.get("first_divergence"),
        }
        for m, p in entries
    ]
    ran = [(m, p) for m, p in entries if _ran(p)]
    if not ran:  # unavailable everywhere (a required path's failure stays)
        first = next((p for _, p in entries if p["status"] == "fail"), entries[0][1])
        reason = (
            "; ".join(f"{m}: {p.get('reason', '')}" for m, p in entries)
            if len(entries) > 1
            else first.get("reason", "")
        )
        return {**first, "reason": reason, "machine": None, "machines": machines}, None
    where = ", ".join(dict.fromkeys(m for m, _ in ran))
    verdicts = {p["status"] for _, p in ran}
    merged = {**ran[0][1], "machine": where, "machines": machines}
    if len(verdicts) == 1:
        return merged, None
    ran_on = [v for v in machines if v["status"] in RAN]
    detail = "; ".join(f"{v['machine']}: {v['status']}" + (f" ({v['reason']})" if v["reason"] else "") for v in ran_on)
    merged.update(status="fail", reason=f"conflict: the machines disagree: {detail}", conflict=True)
    return merged, {"verdicts": ran_on}


def merge_reports(sources: list[Path], reports: list[dict]) -> dict:
    """The merged report.json (already read and checked reports, in the order given)."""
    for source, report in zip(sources, reports, strict=True):
        _check_report(source, report)
    _check_goldens(sources, reports)
    labels = machine_labels(sources, [r["environment"] for r in reports])
    cases: dict[str, dict] = {}  # case -> {"golden", "paths": {path -> [(machine, entry)]}}
    for label, report in zip(labels, reports, strict=True):
        for case in report["cases"]:
            slot = cases.setdefault(case["name"], {"golden": case["golden"], "paths": {}})
            if case.get("coverage") is not None:  # the golden's: the same on every machine
                slot.setdefault("coverage", case["coverage"])
            for p in case["paths"]:
                slot["paths"].setdefault(p["name"], []).append((label, p))
    out_cases, conflicts = [], []
    for name, slot in cases.items():
        paths = []
        for path_name, entries in slot["paths"].items():
            merged, conflict = _merge_path(entries)
            paths.append(merged)
            if conflict:
                conflicts.append({"case": name, "path": path_name, **conflict})
        out_cases.append(
            {
                "name": name,
                "golden": slot["golden"],
                **({"coverage": slot["coverage"]} if "coverage" in slot else {}),
                "paths": paths,
            }
        )
    ok = all(p["status"] in ("pass", "unavailable") for c in out_cases for p in c["paths"])
    machines = [
        {"name": label, "report": str(source), "environment": report["environment"]}
        for label, source, report in zip(labels, sources, reports, strict=True)
    ]
    return {
        "ok": ok,
        "environment": {"merged_from": list(dict.fromkeys(labels))},
        "machines": machines,
        "conflicts": conflicts,
        "cases": out_cases,
    }


# --- output --------------------------------------------------------------------------------
def _as_run_result(merged: dict) -> RunResult:
    """The merged report as the runner's result types, for report.junit (the machine leads
    the reason of a failing row)."""
    cases = []
    for case in merged["cases"]:
        paths = []
        for p in case["paths"]:
            reason = p.get("reason", "")
            if p.get("machine") and p["status"] != "pass" and not p.get("conflict"):
                reason = f"on {p['machine']}: {reason}"
            paths.append(PathResult(p["name"], p["status"], reason=reason, seconds=p.get("seconds")))
        cases.append(CaseResult(case["name"], paths, golden_sha256=(case.get("golden") or {}).get("sha256")))
    return RunResult(cases, merged["environment"])


def _worst(p: dict) -> dict | None:
    tensors = p.get("tensors") or []
    failing = [t for t in tensors if t.get("status") != "pass"]
    if failing:
        return failing[0]
    number = (int, float)
    scored = [t for t in tensors if isinstance(t.get("max_abs"), number) and isinstance(t.get("atol"), number)]
    scored = [t for t in scored if t["atol"]]
    return max(scored, key=lambda t: t["max_abs"] / t["atol"], default=None)


def table(merged: dict) -> str:
    """The terminal view: one row per (case, path) with the machine where it ran."""
    header = ("case", "path", "status", "machine", "worst tap", "max abs")
    rows = []
    for case in merged["cases"]:
        for p in case["paths"]:
            worst = None if p.get("conflict") else _worst(p)  # the machines' tensors differ
            max_abs = worst.get("max_abs") if worst else None
            status = "CONFLICT" if p.get("conflict") else p["status"]
            rows.append(
                (
                    case["name"],
                    p["name"],
                    status,
                    p.get("machine") or "-",
                    worst["name"] if worst else "-",
                    f"{max_abs:.2e}" if isinstance(max_abs, int | float) else "-",
                )
            )
    lines = aligned([header, *rows])
    notes = [
        f"{c['name']} {p['name']}: {p['status']}: {p['reason']}"
        for c in merged["cases"]
        for p in c["paths"]
        if p["status"] in ("fail", "error")
    ]
    counts: dict[str, int] = {}
    for c in merged["cases"]:
        for p in c["paths"]:
            counts[p["status"]] = counts.get(p["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if merged["conflicts"]:
        summary += f"; {len(merged['conflicts'])} conflict(s)"
    machines = [f"machine {m['name']}: {m['report']}" for m in merged["machines"]]
    verdict = "OK" if merged["ok"] else "FAILED"
    return "\n".join([*machines, "", *lines, "", *notes, *([""] if notes else []), f"{verdict}: {summary}"])


def _cell(text) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def markdown(merged: dict) -> bytes:
    lines = [
        f"# Conformance report, merged from {len(merged['machines'])} reports: {'OK' if merged['ok'] else 'FAILED'}",
        "",
    ]
    lines += ["## Machines", "", "| machine | report | cpu | gpu | versions | providers |", "|---|---|---|---|---|---|"]
    for m in merged["machines"]:
        env = m["environment"]
        machine = env.get("machine") if isinstance(env.get("machine"), dict) else {}
        cpu, gpu = machine.get("cpu") or env.get("cpu"), machine.get("gpu") or env.get("gpu")
        versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
        providers = ", ".join(env.get("providers") or [])
        lines.append(
            f"| {_cell(m['name'])} | {_cell(m['report'])} | {_cell(cpu)} | {_cell(gpu)} "
            f"| {_cell(versions)} | {_cell(providers)} |"
        )
    if merged["conflicts"]:
        lines += ["", "## Conflicts", "", "The same (case, path) gave different verdicts on different machines:", ""]
        for c in merged["conflicts"]:
            verdicts = "; ".join(f"{v['machine']}: {v['status']}" for v in c["verdicts"])
            lines.append(f"- {c['case']} / {c['path']}: {verdicts}")
    lines += ["", "## Results", "", "| case | path | status | machine | first divergence | reason |"]
    lines.append("|---|---|---|---|---|---|")
    for case in merged["cases"]:
        for p in case["paths"]:
            status = "**conflict**" if p.get("conflict") else p["status"]
            lines.append(
                f"| {case['name']} | {p['name']} | {status} | {_cell(p.get('machine') or '-')} "
                f"| {_cell(p.get('first_divergence'))} | {_cell(p.get('reason'))} |"
            )
    return ("\n".join(lines) + "\n").encode()


def write_together(folder: Path, payloads: dict[str, bytes]) -> list[Path]:
    try:
        return write_files_together(folder, payloads)
    except FileProblem as exc:
        raise ReportError(f"cannot write the merged report to {folder}: {exc}") from exc


def write(merged: dict, folder: Path) -> list[Path]:
    """report.json, report.md and junit.xml of the merged matrix."""
    return write_together(
        folder,
        {
            "report.json": (json.dumps(merged, indent=2) + "\n").encode(),
            "report.md": markdown(merged),
            "junit.xml": junit(_as_run_result(merged)),
        },
    )
