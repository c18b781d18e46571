#!/usr/bin/env python3
"""Runs the README's WatchBearerToken snippets against a running broker.

The README text itself is what is tested: each snippet is the fenced block
that follows an HTML comment `<!-- ci-snippet: NAME -->` in README.md. They
run in a scratch directory where `proto` links to the repository's proto/, as
if from the repository root:

- `watch-python-stubs` (sh): generates the Python stubs into gen/;
- `watch-python` (python, PYTHONPATH=gen) and `watch-node` (js, NODE_PATH =
  the Node example's node_modules) follow the token. Each must print a line
  saying it got a token within the time limit; it is then stopped (a watch
  runs until the broker ends it). Exiting or failing before that line is a
  failure, and so is a line that carries the token itself.

    python3 .ci/lib/readme_snippets.py --target 127.0.0.1:50051 \
        --node-modules examples/clients/node/node_modules

Each snippet gets BROKER_ADDR = the target and BROKER_CALLER_TOKEN from the
environment (a placeholder when unset: the sandbox does not check it).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*ci-snippet:\s*([\w-]+)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")

# name -> (fence language, how to run it, line that proves it got a token)
SNIPPETS = {
    "watch-python-stubs": ("sh", ["bash", "-euo", "pipefail"], None),
    "watch-python": ("python", [sys.executable], re.compile(r"^new Bearer token, expires \S+")),
    "watch-node": ("js", ["node"], re.compile(r"^new Bearer token, expires \S+")),
}
TIME_LIMIT = 30  # seconds for one snippet to show its first token


class Failed(Exception):
    pass


def extract(readme):
    """{name: (language, code)} of every marked block in the README."""
    lines = readme.splitlines()
    found = {}
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if not marker:
            continue
        name = marker.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = FENCE.match(lines[j]) if j < len(lines) else None
        if not fence:
            raise Failed(f"README.md:{i + 1}: marker {name!r} is not followed by a fenced block")
        end = next((k for k in range(j + 1, len(lines)) if lines[k].strip() == "```"), None)
        if end is None:
            raise Failed(f"README.md:{j + 1}: the block of {name!r} is not closed")
        if name in found:
            raise Failed(f"README.md:{i + 1}: marker {name!r} appears twice")
        found[name] = (fence.group(1), "\n".join(lines[j + 1 : end]) + "\n")
    return found


def run_to_completion(name, command, path, cwd, env):
    result = subprocess.run(
        command + [str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise Failed(f"snippet {name!r} exited with status {result.returncode}")


def run_until_token(name, command, path, cwd, env, expect, secrets):
    """Starts the snippet, waits for its first token line, then stops it."""
    proc = subprocess.Popen(
        command + [str(path)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = threading.Event()
    output = []

    def read():
        for line in proc.stdout:
            output.append(line)
            sys.stdout.write(f"  | {line}")
            if expect.search(line):
                seen.set()
        seen.set()  # end of output: wake the waiter either way

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    got = seen.wait(TIME_LIMIT) and any(expect.search(line) for line in output)
    still_running = proc.poll() is None
    if still_running:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=5)
    if not got:
        if not still_running:
            raise Failed(f"snippet {name!r} exited (status {proc.returncode}) before printing a token line")
        raise Failed(f"snippet {name!r} printed no token line within {TIME_LIMIT} s")
    if not still_running:
        raise Failed(f"snippet {name!r} ended by itself (status {proc.returncode}); a watch should keep running")
    for secret in secrets:
        if secret and any(secret in line for line in output):
            raise Failed(f"snippet {name!r} printed a secret")


def current_token(gen, target, caller_token):
    """The Bearer token the watch snippets are about to receive (they share
    the broker's cache), through the stubs the stubs snippet generated: none
    of them may print it."""
    import grpc

    sys.path.insert(0, str(gen))
    try:
        from payroc.broker.v1 import token_broker_pb2 as pb, token_broker_pb2_grpc as rpc
    finally:
        sys.path.remove(str(gen))
    with grpc.insecure_channel(target) as channel:
        token = rpc.TokenBrokerStub(channel).GetBearerToken(
            pb.GetBearerTokenRequest(processing_terminal_id="1234001"),
            metadata=[("authorization", f"Bearer {caller_token}")],
            timeout=5,
        )
    return token.access_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="broker address (host:port)")
    parser.add_argument("--node-modules", required=True, type=Path, help="node_modules with @grpc/grpc-js")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = parser.parse_args()

    try:
        snippets = extract(args.readme.read_text(encoding="utf-8"))
        unknown = sorted(set(snippets) - set(SNIPPETS))
        missing = sorted(set(SNIPPETS) - set(snippets))
        if unknown or missing:
            raise Failed(f"README.md snippet markers: unknown {unknown}, missing {missing}")

        caller_token = os.environ.get("BROKER_CALLER_TOKEN") or "readme-snippet-placeholder-token"
        env = dict(
            os.environ,
            BROKER_ADDR=args.target,
            BROKER_CALLER_TOKEN=caller_token,
            PYTHONPATH="gen",
            PYTHONUNBUFFERED="1",
            NODE_PATH=str(args.node_modules.resolve()),
        )
        with tempfile.TemporaryDirectory(prefix="readme-snippets-") as scratch:
            cwd = Path(scratch)
            (cwd / "proto").symlink_to(REPO / "proto")
            for name, (language, command, expect) in SNIPPETS.items():
                fence_language, code = snippets[name]
                if fence_language != language:
                    raise Failed(f"snippet {name!r} is a ```{fence_language} block, expected ```{language}")
                path = cwd / f"{name}.{ {'sh': 'sh', 'python': 'py', 'js': 'js'}[language] }"
                path.write_text(code, encoding="utf-8")
                print(f"==> README snippet {name} ({language})", flush=True)
                started = time.monotonic()
                if expect is None:
                    run_to_completion(name, command, path, cwd, env)
                else:
                    secrets = [caller_token, current_token(cwd / "gen", args.target, caller_token)]
                    run_until_token(name, command, path, cwd, env, expect, secrets)
                print(f"ok: README snippet {name} ({time.monotonic() - started:.1f} s)", flush=True)
    except Failed as failed:
        sys.exit(f"README snippets FAILED: {failed}")
    print(f"README snippets passed against {args.target}")


if __name__ == "__main__":
    main()
