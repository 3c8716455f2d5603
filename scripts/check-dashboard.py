#!/usr/bin/env python3
"""Checks docs/grafana/micropod-dashboard.json and docs/metrics.md against the metrics contract.

Every `micropod_*` name in the dashboard's queries (panels and template variables) and in
docs/metrics.md must be a series micropod exports, spelled as on the wire. With `promtool` on
PATH (Debian: `apt-get install prometheus`) it also parses every query, the example queries and
the alerting rules of docs/metrics.md with `promtool check rules`; without it that step is
skipped and says so. Exit status 0 when everything passes, 1 otherwise.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The series of the contract (issue 6), exactly as they appear on the wire.
SERIES = frozenset(
    {
        "micropod_up",
        "micropod_datapath",
        "micropod_endpoint_info",
        "micropod_endpoint_receive_packets_total",
        "micropod_endpoint_receive_bytes_total",
        "micropod_endpoint_transmit_packets_total",
        "micropod_endpoint_transmit_bytes_total",
        "micropod_endpoint_drops_total",
        "micropod_nat_entries",
        "micropod_nat_entries_limit",
        "micropod_nat_flows",
        "micropod_nat_flows_created_total",
        "micropod_nat_flows_reclaimed_total",
        "micropod_nat_allocation_failures_total",
        "micropod_nat_packets_total",
        "micropod_ipam_addresses_used",
        "micropod_ipam_addresses_limit",
        "micropod_scrape_duration_seconds",
    }
)

# `\b` keeps e.g. `DS_micropod_x` out; names are lower case on the wire.
NAME = re.compile(r"\bmicropod_[a-z_]+")

# Grafana's variables, replaced by values PromQL accepts for the syntax check.
GRAFANA_VARS = {"$__rate_interval": "5m", "$instance": ".*", "$endpoint": ".*"}

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs/grafana/micropod-dashboard.json"
DOC = ROOT / "docs/metrics.md"


def walk_panels(panels):
    """Panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(dash, errors):
    """(where, query) for every panel target and every query template variable."""
    queries = []
    for panel in walk_panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            where = f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}"
            if not expr.strip():
                errors.append(f"{where}: empty expr")
                continue
            queries.append((where, expr))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        queries.append((f"variable ${var.get('name')}", query or var.get("definition", "")))
    return queries


def doc_blocks(text, language):
    """The bodies of the fenced code blocks of one language in a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def check_names(where, text, errors):
    for name in sorted(set(NAME.findall(text))):
        if name not in SERIES:
            errors.append(f"{where}: {name} is not a micropod series")


def check_structure(dash, errors):
    for key in ("title", "uid"):
        if not isinstance(dash.get(key), str) or not dash[key]:
            errors.append(f"dashboard: no {key}")
    if not isinstance(dash.get("panels"), list) or not dash["panels"]:
        errors.append("dashboard: no panels")
        return
    ids = [p.get("id") for p in walk_panels(dash["panels"])]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if duplicates:
        errors.append(f"dashboard: panel ids used twice: {duplicates}")


def promtool_check(exprs, alert_files, errors):
    """Parses the expressions as recording rules, and each alerting example, with promtool."""
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool not found: PromQL syntax not checked (apt-get install prometheus)")
        return
    with tempfile.TemporaryDirectory(prefix="micropod-check-") as tmp:
        rules = [{"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
        exprs_file = Path(tmp, "exprs.rules.yml")
        # JSON is YAML: no quoting questions.
        exprs_file.write_text(json.dumps({"groups": [{"name": "exprs", "rules": rules}]}))
        files = [exprs_file]
        for i, body in enumerate(alert_files):
            path = Path(tmp, f"alerts-{i}.rules.yml")
            path.write_text(body)
            files.append(path)
        result = subprocess.run(
            [promtool, "check", "rules", *map(str, files)], capture_output=True, text=True
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            # promtool names a failing rule by its index; map it back to where it came from.
            output = re.sub(
                r"check:expr_(\d+)\b",
                lambda m: "{} ({}: {})".format(m.group(0), *exprs[int(m.group(1))]),
                output,
            )
            errors.append(f"promtool check rules failed:\n{output}")
        else:
            print(f"promtool: {len(exprs)} expressions and {len(alert_files)} rule file(s) parse")


def main():
    errors = []
    try:
        dash = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read {DASHBOARD}: {e}", file=sys.stderr)
        return 1
    check_structure(dash, errors)

    exprs = dashboard_queries(dash, errors)
    for where, query in exprs:
        check_names(f"dashboard {where}", query, errors)

    doc = DOC.read_text()
    check_names(str(DOC.relative_to(ROOT)), doc, errors)

    # The example queries: one expression per line, comments above them.
    for block in doc_blocks(doc, "promql"):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                exprs.append(("docs/metrics.md example", line.strip()))
    alert_files = [b for b in doc_blocks(doc, "yaml") if b.lstrip().startswith("groups:")]
    if not alert_files:
        errors.append("docs/metrics.md: no alerting rules example (a yaml block with groups:)")

    promql = []
    for where, expr in exprs:
        if where.startswith("variable "):
            # Grafana's label_values(SELECTOR, LABEL) is not PromQL; its selector is.
            m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", expr)
            if m is None:
                errors.append(f"{where}: not label_values(SELECTOR, LABEL): {expr!r}")
                continue
            expr = m.group(1)
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        if "$" in expr:
            errors.append(f"{where}: unknown Grafana variable in {expr!r}")
            continue
        promql.append((where, expr))
    promtool_check(promql, alert_files, errors)

    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"ok: {len(exprs)} queries; every micropod_* name is one of {len(SERIES)} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
