#!/usr/bin/env python3
"""Checks the alert rules beyond `promtool check rules` / `promtool test rules`
(which .ci/run runs itself):

- every alert has a severity (critical: pages, warning: a ticket), a summary,
  a description, and a runbook_url naming a heading of docs/operations.md;
- every alert has a unit test where it fires and one where it stays quiet;
- the rendered PrometheusRule's groups pass `promtool check rules` too.

`--self-test` first proves the unit tests can fail: in a copy of the rules
under target/ci, each alert in turn is broken twice, once so that it never
fires and once by the eager change in MUTATIONS (a threshold, a `for:`, a
matcher), and `promtool test rules` must fail every time (and pass on the
unbroken copy).

Usage: check_rules.py [--self-test]   (from anywhere; promtool on PATH)
"""

import os
import re
import shutil
import subprocess
import sys

import yaml

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
RULES = "deploy/prometheus/payroc-broker-rules.yaml"
TESTS = "deploy/prometheus/payroc-broker-rules.test.yaml"
OPERATOR = "deploy/prometheus/payroc-broker-prometheusrule.yaml"
DOCS = "docs/operations.md"
SCRATCH = "target/ci/rules"
SEVERITIES = {"critical", "warning"}

# Per alert: (field, old, new), a change that makes the alert fire where a
# quiet case says it must not. `old` must be in the field, so a rule edited
# without its mutation fails here rather than silently testing nothing.
MUTATIONS = {
    "PayrocBrokerTokenExpiring": ("expr", "< 180", "< 200"),
    "PayrocBrokerNoToken": ("for", "5m", "3m"),
    "PayrocBrokerTokenRefreshFailing": ("expr", ">= 3", ">= 2"),
    "PayrocBrokerKeyRejected": ("expr", '"401|403"', '"401|403|429"'),
    "PayrocBrokerUpstreamErrors": ("expr", "> 0.05", "> 0.03"),
    "PayrocBrokerCallerServerErrors": ("expr", "> 0.01", "> 0.009"),
    "PayrocBrokerSessionsFailing": ("expr", "> 0.05", "> 0.02"),
    "PayrocBrokerLoadShed": ("expr", "- (", "+ ("),
    "PayrocBrokerCallersRateLimited": ("expr", "> 60", "> 40"),
    "PayrocBrokerAuthFailures": ("expr", "> 10", ">= 10"),
    "PayrocBrokerSlowBearerTokens": ("expr", "> 0.5", "> 0.0005"),
    "PayrocBrokerLogLinesDropped": ("expr", "> 0", ">= 0"),
    "PayrocBrokerTraceSpansDropped": ("for", "15m", "5m"),
    "PayrocBrokerVersionSkew": ("expr", "> 1", ">= 1"),
    "PayrocBrokerTargetDown": ("expr", 'up{job="payroc-broker"}', "up"),
    "PayrocBrokerAbsent": ("for", "5m", "3m"),
}
NEVER_FIRES = "vector(1) < 0"


def load(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return yaml.safe_load(f)


def alerts(rules):
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def slug(heading):
    """The anchor GitHub (and most renderers) give a Markdown heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(markdown):
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", markdown, re.M)}


def problems(rules, tests, docs):
    out = []
    known = anchors(docs)
    fires, quiet = set(), set()
    for group in tests["tests"]:
        for t in group.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = [a["alert"] for a in alerts(rules)]
    for a in alerts(rules):
        name = a["alert"]
        if a.get("labels", {}).get("severity") not in SEVERITIES:
            out.append(f"{name}: severity must be one of {sorted(SEVERITIES)}")
        notes = a.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                out.append(f"{name}: no {key} annotation")
        url = notes.get("runbook_url", "")
        page, _, anchor = url.partition("#")
        if page != DOCS or anchor not in known:
            out.append(f"{name}: runbook_url {url!r} names no heading of {DOCS}")
        if name not in fires:
            out.append(f"{name}: no unit test where it fires")
        if name not in quiet:
            out.append(f"{name}: no unit test where it stays quiet")
    for name in (fires | quiet) - set(names):
        out.append(f"{TESTS}: tests an alert the rules do not have: {name}")
    if len(set(names)) != len(names):
        out.append(f"{RULES}: an alert name appears twice")
    return out


def promtool(*args):
    return subprocess.run(["promtool", *args], capture_output=True, text=True)


def write_yaml(path, doc):
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)


def self_test(rules, tests):
    """None, or why the unit tests did not catch a broken rule."""
    scratch = os.path.join(ROOT, SCRATCH, "self-test")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    rules_copy = os.path.join(scratch, os.path.basename(RULES))
    tests_copy = os.path.join(scratch, os.path.basename(TESTS))
    shutil.copy(os.path.join(ROOT, TESTS), tests_copy)

    write_yaml(rules_copy, rules)
    r = promtool("test", "rules", tests_copy)
    if r.returncode != 0:
        return f"the unbroken copy already fails:\n{r.stdout}{r.stderr}"
    missing = {a["alert"] for a in alerts(rules)} ^ set(MUTATIONS)
    if missing:
        return f"MUTATIONS and the rules name different alerts: {sorted(missing)}"

    caught = 0
    for rule in alerts(rules):
        field, old, new = MUTATIONS[rule["alert"]]
        if old not in str(rule.get(field, "")):
            return f"{rule['alert']}: its mutation expects {old!r} in its {field}"
        for what, change in (
            ("never fires", ("expr", None, NEVER_FIRES)),
            (f"{field} {old!r} -> {new!r}", (field, old, new)),
        ):
            broken = yaml.safe_load(yaml.safe_dump(rules))
            target = next(a for a in alerts(broken) if a["alert"] == rule["alert"])
            f, o, n = change
            target[f] = n if o is None else target[f].replace(o, n, 1)
            write_yaml(rules_copy, broken)
            r = promtool("test", "rules", tests_copy)
            if r.returncode == 0:
                return f"{rule['alert']} broken ({what}) and `promtool test rules` still passes"
            if f"alertname: {rule['alert']}," not in r.stdout + r.stderr:
                return f"{rule['alert']} broken ({what}): promtool failed, but not on that alert:\n{r.stdout}"
            caught += 1
    print(f"check_rules self-test: {caught} broken rules ({len(MUTATIONS)} alerts, "
          "never firing and made eager), each failed `promtool test rules` on that alert")
    return None


def main(argv):
    rules, tests = load(RULES), load(TESTS)
    with open(os.path.join(ROOT, DOCS), encoding="utf-8") as f:
        docs = f.read()
    if "--self-test" in argv:
        failure = self_test(rules, tests)
        if failure:
            print(f"check_rules self-test FAILED: {failure}", file=sys.stderr)
            return 1
    found = problems(rules, tests, docs)

    # The operator's copy, checked as what Prometheus will load.
    operator = load(OPERATOR)
    os.makedirs(os.path.join(ROOT, SCRATCH), exist_ok=True)
    spec = os.path.join(ROOT, SCRATCH, "prometheusrule-spec.yaml")
    write_yaml(spec, operator["spec"])
    r = promtool("check", "rules", spec)
    if r.returncode != 0:
        found.append(f"{OPERATOR}: promtool check rules failed:\n{r.stdout}{r.stderr}")

    if found:
        for p in found:
            print(f"error: {p}", file=sys.stderr)
        return 1
    print(f"rules: {len(alerts(rules))} alerts, each with severity, summary, description, "
          f"a runbook in {DOCS}, and a firing and a quiet unit test")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
