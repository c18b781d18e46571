#!/usr/bin/env python3
"""Fetches a Bearer token from the broker's identity endpoint the way Payroc's
official SDKs do, then calls Payroc's API with it as an SDK would: standard
library only (urllib), no gRPC, no SDK.

    python3 examples/clients/http/sdk_shaped.py \
        --identity-base http://127.0.0.1:8080/credentials/demo \
        --api-base https://api.payroc.com/v1 --terminal 1234001

The caller token is the "API key" an SDK sends (`x-api-key`); it comes from
the environment (BROKER_CALLER_TOKEN), never the command line. With --check,
also confirms the endpoint's refusals (405 with Allow, 404 problem documents)
and exits non-zero on any surprise.
"""

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
import uuid


def post(url, headers, body=None, context=None):
    """POSTs `body` (bytes or None); returns (status, headers, parsed JSON)."""
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--identity-base", required=True,
                   help="the SDK's identity URL: https://broker:8080/credentials/<name>")
    p.add_argument("--api-base", required=True, help="Payroc's API base URL (.../v1)")
    p.add_argument("--terminal", required=True, help="processing terminal id")
    p.add_argument("--lib-version", default="1.7.0.261471",
                   help="Hosted Fields libVersion for the session")
    p.add_argument("--ca-file", help="CA to trust for an https identity URL")
    p.add_argument("--check", action="store_true", help="also check the refusals")
    args = p.parse_args()
    key = os.environ.get("BROKER_CALLER_TOKEN", "")
    if not key:
        fail("set BROKER_CALLER_TOKEN to the service's caller token")
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None

    # What every SDK sends: POST {identity}/authorize, x-api-key, no body
    # (Go's sends a small JSON one; the broker ignores it either way).
    status, headers, token = post(
        f"{args.identity_base}/authorize", {"x-api-key": key}, context=context)
    if status != 200:
        fail(f"identity endpoint answered {status}: {token}")
    if set(token) != {"access_token", "token_type", "expires_in", "scope"}:
        fail(f"not Payroc's fields: {sorted(token)}")
    if token["token_type"] != "Bearer" or not isinstance(token["expires_in"], int) \
            or token["expires_in"] <= 0:
        fail(f"unexpected token_type or expires_in: {token['token_type']!r}, {token['expires_in']!r}")
    if headers.get("Cache-Control") != "no-store":
        fail("the token answer may be cached")
    print(f"Bearer token: expires_in {token['expires_in']} s, scope {token['scope']!r}")

    # Then the SDK calls Payroc itself with it: a Hosted Fields session.
    status, _, session = post(
        f"{args.api_base}/processing-terminals/{args.terminal}/hosted-fields-sessions",
        {
            "Authorization": f"Bearer {token['access_token']}",
            "Content-Type": "application/json",
            "Idempotency-Key": str(uuid.uuid4()),
        },
        json.dumps({"libVersion": args.lib_version, "scenario": "payment"}).encode(),
    )
    if status != 201 or not session.get("token"):
        fail(f"sessions endpoint answered {status}: {session}")
    print(f"session token for terminal {session['processingTerminalId']}: "
          f"{len(session['token'])} characters")

    if args.check:
        req = urllib.request.Request(f"{args.identity_base}/authorize", method="GET",
                                     headers={"x-api-key": key})
        try:
            urllib.request.urlopen(req, timeout=10, context=context)
            fail("GET was answered")
        except urllib.error.HTTPError as e:
            if e.code != 405 or e.headers.get("Allow") != "POST":
                fail(f"GET: {e.code}, Allow {e.headers.get('Allow')!r}")
        base = args.identity_base.rsplit("/", 1)[0]
        status, headers, problem = post(
            f"{base}/no-such-credential/authorize", {"x-api-key": key}, context=context)
        if status != 404 or headers.get("Content-Type") != "application/problem+json" \
                or problem.get("status") != 404 or problem.get("code") != "NOT_FOUND":
            fail(f"unknown credential: {status} {problem}")
        print("refusals: 405 with Allow: POST, 404 problem document")


if __name__ == "__main__":
    main()
