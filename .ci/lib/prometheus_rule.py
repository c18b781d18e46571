#!/usr/bin/env python3
"""Renders deploy/prometheus/payroc-broker-rules.yaml (plain Prometheus rule
groups, the one source) as a PrometheusRule for the Prometheus Operator, so
the two cannot say different things.

Usage: prometheus_rule.py           write deploy/prometheus/payroc-broker-prometheusrule.yaml
       prometheus_rule.py --check   exit 1 if the committed file is not what it would write
"""

import os
import sys

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SOURCE = "deploy/prometheus/payroc-broker-rules.yaml"
TARGET = "deploy/prometheus/payroc-broker-prometheusrule.yaml"

HEADER = f"""\
# Generated from {SOURCE} by .ci/lib/prometheus_rule.py: edit that
# file and run the script; CI fails when this one differs. Runbooks and the
# unit tests are described there.
"""


class Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer expressions) as literal blocks, as in
    the source, rather than one quoted line."""


def _str(dumper, s):
    style = "|" if "\n" in s else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)


Dumper.add_representer(str, _str)


def render():
    with open(os.path.join(ROOT, SOURCE), encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "payroc-broker",
            "labels": {"app.kubernetes.io/name": "payroc-broker"},
        },
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return HEADER + body


def main():
    text = render()
    path = os.path.join(ROOT, TARGET)
    if sys.argv[1:] == ["--check"]:
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print(
                f"error: {TARGET} is not rendered from {SOURCE}; "
                "run python3 .ci/lib/prometheus_rule.py and commit the result",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"{TARGET} is rendered from {SOURCE}")
    elif sys.argv[1:]:
        sys.exit(__doc__)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
