#!/usr/bin/env python3
"""Checks the Grafana dashboard's PromQL and the metric names it and the
alert rules use:

- every `expr` of every panel target (rows' panels included), and the
  selector of every `label_values(...)` variable query, with Grafana's
  variables replaced by concrete values ($__rate_interval -> 5m, $credential
  and ${rpc} -> the variable's allValue or a plain word), is written as a
  recording rule into a generated file under target/ci and must pass
  `promtool check rules`; a variable the dashboard does not define is an error;
- every panel and target queries the `${datasource}` variable, which exists;
- every metric name in those expressions and in the rule files' expressions
  is a family of the broker's live `/metrics` scrape (a `# TYPE` line, with
  _bucket/_sum/_count for histograms) or `up`, which Prometheus itself adds
  for every target.

`--self-test` first plants a broken expression and an unknown metric name in
a copy of the dashboard and requires both to be caught (and the unchanged
copy to pass).

Usage: check_dashboard.py [--self-test] --metrics SCRAPE_FILE DASHBOARD_JSON [RULE_FILE ...]
"""

import copy
import json
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
SCRATCH = os.path.join(ROOT, "target", "ci", "dashboard")

# Grafana's own variables, as a query would see them (any valid value does).
BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
}
# Series Prometheus adds for every scrape target; the broker cannot emit them.
PROMETHEUS_OWN = {"up"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan", "atan2"}
VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)(?::\w+)?\]\]")


def panels(dash):
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(dash):
    """(where, raw PromQL) for every target and variable query."""
    for p in panels(dash):
        for t in p.get("targets", []):
            if "expr" in t:
                yield f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"]
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q
        if v.get("type") != "query" or not q:
            continue
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        if m:
            yield f"variable {v['name']!r}", m.group(1)
        elif not re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", q):
            m = re.fullmatch(r"\s*query_result\((.*)\)\s*", q)
            yield f"variable {v['name']!r}", m.group(1) if m else q


def substitute(expr, variables):
    """`expr` with Grafana's variables replaced; raises KeyError naming an
    undefined one."""
    def value(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name not in variables:
            raise KeyError(name)
        return variables[name]
    return VAR.sub(value, expr)


def metric_names(expr):
    """The metric names a PromQL expression selects: identifiers that are not
    functions, keywords, label names or durations."""
    s = re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", s):
        if re.match(r"\s*\(", s[m.end():]) or m.group(0).lower() in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def scraped_families(text):
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            name, kind = m.groups()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
    return names


def rule_exprs(path):
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    groups = doc.get("groups") or doc.get("spec", {}).get("groups", [])
    for g in groups:
        for r in g["rules"]:
            yield f"{os.path.relpath(path, ROOT)}: {r.get('alert') or r.get('record')}", r["expr"]


def check(dash, rule_files, families, tag):
    """The problems found; writes the generated rule file as target/ci/dashboard/TAG.rules.yaml."""
    problems = []
    variables = {}
    for v in dash.get("templating", {}).get("list", []):
        variables[v["name"]] = v.get("allValue") or "value"
    ds = [v for v in dash.get("templating", {}).get("list", []) if v.get("type") == "datasource"]
    if [v["name"] for v in ds] != ["datasource"] or ds[0].get("query") != "prometheus":
        problems.append("the dashboard needs one Prometheus data source variable named `datasource`")
    for p in panels(dash):
        for obj in [p] * (p.get("type") != "row") + p.get("targets", []):
            if obj.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"panel {p['id']} {p.get('title')!r}: datasource is not ${{datasource}}")

    rules, named = [], []
    for i, (where, raw) in enumerate(queries(dash)):
        try:
            expr = substitute(raw, variables)
        except KeyError as e:
            problems.append(f"{where}: uses ${e.args[0]}, which the dashboard does not define")
            continue
        # The record name carries the index; the comment maps it back.
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        named.append((where, expr))
    os.makedirs(SCRATCH, exist_ok=True)
    generated = os.path.join(SCRATCH, f"{tag}.rules.yaml")
    with open(generated, "w", encoding="utf-8") as f:
        for i, (where, _) in enumerate(named):
            f.write(f"# dashboard:query_{i}: {where}\n")
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f, sort_keys=False)
    r = subprocess.run(["promtool", "check", "rules", generated], capture_output=True, text=True)
    if r.returncode != 0:
        out = r.stdout + r.stderr
        for i, (where, _) in enumerate(named):
            if re.search(rf'"dashboard:query_{i}"', out):
                problems.append(f"{where}: promtool check rules refuses its expression")
        problems.append(f"promtool check rules {os.path.relpath(generated, ROOT)}:\n{out.strip()}")

    for path in rule_files:
        named += list(rule_exprs(path))
    for where, expr in named:
        for name in sorted(metric_names(expr) - families - PROMETHEUS_OWN):
            problems.append(f"{where}: metric {name} is not in the broker's /metrics")
    return problems, len(rules)


def self_test(dash, rule_files, families):
    """None, or why a planted mistake went unnoticed."""
    clean, _ = check(dash, rule_files, families, "self-test-clean")
    if clean:
        return "the unchanged copy already has problems:\n" + "\n".join(clean)
    broken = copy.deepcopy(dash)
    targets = [t for p in panels(broken) for t in p.get("targets", [])]
    if len(targets) < 2:
        return "the dashboard has fewer than two targets to plant mistakes in"
    targets[0]["expr"] = "sum(rate(payroc_broker_rpcs_total[$__rate_interval])"
    targets[1]["expr"] = "sum(rate(payroc_broker_rpcs_totl[$__rate_interval]))"
    found, _ = check(broken, rule_files, families, "self-test-broken")
    text = "\n".join(found)
    if "promtool check rules refuses" not in text:
        return f"an unbalanced parenthesis was not caught: {found}"
    if "metric payroc_broker_rpcs_totl is not in" not in text:
        return f"an unknown metric name was not caught: {found}"
    print("check_dashboard self-test: a broken expression and an unknown metric name are both caught")
    return None


def main(argv):
    args = argv[1:]
    self_testing = "--self-test" in args
    args = [a for a in args if a != "--self-test"]
    if len(args) < 3 or args[0] != "--metrics":
        sys.exit(__doc__)
    scrape, dashboard, rule_files = args[1], args[2], args[3:]
    with open(scrape, encoding="utf-8") as f:
        families = scraped_families(f.read())
    if not any(n.startswith("payroc_broker_") for n in families):
        print(f"error: {scrape} has no payroc_broker_ families: not a broker scrape", file=sys.stderr)
        return 1
    with open(dashboard, encoding="utf-8") as f:
        dash = json.load(f)
    if self_testing:
        failure = self_test(dash, rule_files, families)
        if failure:
            print(f"check_dashboard self-test FAILED: {failure}", file=sys.stderr)
            return 1
    problems, n = check(dash, rule_files, families, "dashboard")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    print(f"dashboard: {n} expressions pass promtool; every metric they and "
          f"{len(rule_files)} rule file(s) name is in the live scrape ({len(families)} names)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
