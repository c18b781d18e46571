#!/usr/bin/env python3
"""A small Python client for payroc-broker's TokenBroker gRPC API.

It builds the Python stubs from proto/ at start-up, so nothing generated is
checked in. It asks for a Bearer token and a Hosted Fields session token for one
processing terminal and prints them, masking the secrets; takes the current
token from WatchBearerToken; then sends two deliberately bad requests and
prints the rich error details (google.rpc BadRequest, ErrorInfo, RetryInfo)
the broker answers with.

    python3 -m pip install -r examples/clients/python/requirements.txt
    payroc-broker sandbox --listen 127.0.0.1:50051 &
    python3 examples/clients/python/client.py --target 127.0.0.1:50051 --terminal 1234001

With --check it also checks the broker's behaviour against the sandbox
(`payroc-broker sandbox`) and exits non-zero on the first thing that is wrong.
With --check-rate-limit it only checks a broker whose caller (this token) may
make one call a minute, as .ci/run starts: UNAUTHENTICATED without the token,
then CALLER_RATE_LIMITED with RetryInfo.

Against `payroc-broker sandbox --tls`, pass the files it prints: --ca (trust
for the server), --cert and --key (the client certificate, the caller's
identity); --check then also checks that the same call over TLS without the
certificate is UNAUTHENTICATED.
"""

import argparse
import datetime
import importlib
import importlib.resources
import os
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto"
PROTO_FILE = "payroc/broker/v1/token_broker.proto"
TIMEOUT = 5  # seconds: the gRPC deadline of every call

# The sandbox's demo terminals and the credential that serves each.
SANDBOX_CREDENTIALS = {"1234001": "demo", "1234002": "demo", "5678001": "demo-eu"}


def load_stubs():
    """Generates token_broker_pb2(_grpc) from proto/ into a temporary directory
    and imports them. Returns (messages module, stubs module)."""
    # google/protobuf/*.proto (Duration, Timestamp) ship inside grpc_tools.
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="payroc-broker-stubs-") as out:
        status = protoc.main([
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ])
        if status != 0:
            sys.exit(f"error: protoc could not compile {PROTO_ROOT / PROTO_FILE}")
        sys.path.insert(0, out)
        try:
            pb2 = importlib.import_module("payroc.broker.v1.token_broker_pb2")
            pb2_grpc = importlib.import_module("payroc.broker.v1.token_broker_pb2_grpc")
        finally:
            sys.path.remove(out)
    return pb2, pb2_grpc


def mask(secret):
    """Never print a whole token: its first 4 characters are enough to tell two apart."""
    return secret[:4] + "…" if secret else "(empty)"


def when(timestamp):
    return timestamp.ToDatetime(tzinfo=datetime.timezone.utc)


def describe_error(err):
    """The status code, message and google.rpc details of a failed call."""
    lines = [f"{err.code().name}: {err.details()}"]
    status = rich_status(err)
    for any_detail in status.details if status else []:
        for name, violation in bad_request_violations(any_detail):
            lines.append(f"  field {name}: {violation}")
        info = unpack(any_detail, "ErrorInfo")
        if info is not None:
            lines.append(f"  error info: {info.domain} {info.reason} {dict(info.metadata)}")
        retry = unpack(any_detail, "RetryInfo")
        if retry is not None:
            lines.append(f"  retry after {retry.retry_delay.ToTimedelta()}")
    return "\n".join(lines)


def rich_status(err):
    """The google.rpc.Status carried in the `grpc-status-details-bin` trailer, or None."""
    try:
        from grpc_status import rpc_status  # pip install grpcio-status
    except ImportError:
        return None
    try:
        return rpc_status.from_call(err)
    except ValueError:  # the trailer disagrees with the call's own code or message
        return None


def unpack(any_detail, type_name):
    from google.rpc import error_details_pb2

    message_type = getattr(error_details_pb2, type_name)
    if not any_detail.Is(message_type.DESCRIPTOR):
        return None
    message = message_type()
    any_detail.Unpack(message)
    return message


def bad_request_violations(any_detail):
    bad_request = unpack(any_detail, "BadRequest")
    if bad_request is None:
        return []
    return [(v.field, v.description) for v in bad_request.field_violations]


def call_options(caller_token):
    metadata = [("authorization", f"Bearer {caller_token}")] if caller_token else None
    return {"timeout": TIMEOUT, "metadata": metadata}


def demo(pb2, stub, terminal, opts):
    """What a service using the broker does: one Bearer token, one session token."""
    token = stub.GetBearerToken(
        pb2.GetBearerTokenRequest(processing_terminal_id=terminal), **opts
    )
    print(f"GetBearerToken({terminal})")
    print(f"  token_type   {token.token_type}")
    print(f"  access_token {mask(token.access_token)}")
    print(f"  credential   {token.credential}")
    print(f"  expires_at   {when(token.expires_at).isoformat()}")
    print(f"  scopes       {' '.join(token.scopes)}")

    session = stub.CreateSession(
        pb2.CreateSessionRequest(
            processing_terminal_id=terminal, scenario=pb2.SCENARIO_PAYMENT
        ),
        **opts,
    )
    print(f"CreateSession({terminal}, SCENARIO_PAYMENT)")
    print(f"  session_token   {mask(session.session_token)}")
    print(f"  idempotency_key {session.idempotency_key}")
    print(f"  lib_version     {session.lib_version}")
    print(f"  expires_at      {when(session.expires_at).isoformat()}")

    # A long-lived client follows the token instead of polling: the first
    # message is the current token, each later one replaces it before it
    # runs out. Here only the first is taken.
    watch = stub.WatchBearerToken(
        pb2.WatchBearerTokenRequest(processing_terminal_id=terminal), **opts
    )
    try:
        watched = next(watch)
    finally:
        watch.cancel()
    print(f"WatchBearerToken({terminal}): first message")
    print(f"  access_token {mask(watched.access_token)}")
    print(f"  expires_at   {when(watched.expires_at).isoformat()}")
    return token, session, watched


def bad_requests(pb2, stub, terminal, session, opts):
    """Two deliberately bad requests, and the rich details of their errors:
    a terminal id that is too short (the broker's own BadRequest), and an
    idempotency key reused for another request (Payroc's 409, as ErrorInfo)."""
    errors = {}
    for label, call in [
        ("GetBearerToken with processing_terminal_id \"12\"",
         lambda: stub.GetBearerToken(
             pb2.GetBearerTokenRequest(processing_terminal_id="12"), **opts)),
        ("CreateSession reusing an idempotency_key for another scenario",
         lambda: stub.CreateSession(
             pb2.CreateSessionRequest(
                 processing_terminal_id=terminal,
                 scenario=pb2.SCENARIO_TOKENIZATION,
                 idempotency_key=session.idempotency_key,
             ),
             **opts,
         )),
    ]:
        try:
            call()
        except grpc.RpcError as err:
            print(f"{label}:")
            print("  " + describe_error(err).replace("\n", "\n  "))
            errors[label] = err
        else:
            print(f"{label}: unexpectedly succeeded")
            errors[label] = None
    return list(errors.values())


class CheckFailed(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise CheckFailed(what)
    print(f"ok: {what}")


def expect_error(call, code, field=None):
    """Runs `call`, which must fail with `code`; with `field`, the error must
    carry a google.rpc.BadRequest violation naming that request field."""
    try:
        call()
    except grpc.RpcError as err:
        if err.code() != code:
            raise CheckFailed(f"expected {code.name}, got {describe_error(err)}")
        if field is not None:
            fields = violation_fields(err)
            if field not in fields:
                raise CheckFailed(
                    f"{code.name} without a BadRequest violation naming {field!r} "
                    f"(violations: {fields}; {describe_error(err)})"
                )
        return
    raise CheckFailed(f"expected {code.name}, but the call succeeded")


def violation_fields(err):
    """The request fields named by the error's google.rpc.BadRequest details."""
    status = rich_status(err)
    return [
        name
        for detail in (status.details if status else [])
        for name, _ in bad_request_violations(detail)
    ]


def error_infos(err):
    status = rich_status(err)
    return [
        info
        for detail in (status.details if status else [])
        for info in [unpack(detail, "ErrorInfo")]
        if info is not None
    ]


def check(pb2, stub, terminal, opts, token, session, watched, errors):
    now = datetime.datetime.now(datetime.timezone.utc)

    expect(
        watched.access_token == token.access_token and watched.credential == token.credential,
        "WatchBearerToken starts with the token GetBearerToken returned (one shared cache)",
    )
    too_short, reused_key = errors
    expect(
        too_short is not None
        and too_short.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "processing_terminal_id" in violation_fields(too_short),
        "the short terminal id is INVALID_ARGUMENT with a BadRequest naming processing_terminal_id",
    )
    expect(
        reused_key is not None
        and reused_key.code() == grpc.StatusCode.ALREADY_EXISTS
        and any(
            i.domain == "payroc.com" and i.reason == "IDEMPOTENCY_KEY_IN_USE" and "status" in i.metadata
            for i in error_infos(reused_key)
        ),
        "the reused idempotency_key is ALREADY_EXISTS with ErrorInfo payroc.com IDEMPOTENCY_KEY_IN_USE",
    )

    expect(token.token_type == "Bearer", 'token_type is "Bearer"')
    expect(token.access_token != "", "access_token is not empty")
    expect(when(token.expires_at) > now, "the Bearer token expires in the future")
    if terminal in SANDBOX_CREDENTIALS:
        name = SANDBOX_CREDENTIALS[terminal]
        expect(token.credential == name, f'terminal {terminal} is served by credential "{name}"')

    expect(session.processing_terminal_id == terminal, "the session names the terminal")
    expect(session.session_token != "", "session_token is not empty")
    expect(when(session.expires_at) > now, "the session token expires in the future")
    expect(session.lib_version != "", "the session reports its lib_version")
    try:
        key = uuid.UUID(session.idempotency_key)
    except ValueError:
        key = None
    expect(
        key is not None and key.version == 4 and str(key) == session.idempotency_key.lower(),
        f"the generated idempotency_key {session.idempotency_key!r} is a UUID v4",
    )

    replay = stub.CreateSession(
        pb2.CreateSessionRequest(
            processing_terminal_id=terminal,
            scenario=pb2.SCENARIO_PAYMENT,
            idempotency_key=session.idempotency_key,
        ),
        **opts,
    )
    expect(
        replay.session_token == session.session_token
        and replay.idempotency_key == session.idempotency_key,
        "CreateSession with the same idempotency_key replays the same session token",
    )

    for rpc, request in [
        ("GetBearerToken", lambda t: pb2.GetBearerTokenRequest(processing_terminal_id=t)),
        ("CreateSession", lambda t: pb2.CreateSessionRequest(
            processing_terminal_id=t, scenario=pb2.SCENARIO_PAYMENT)),
    ]:
        method = getattr(stub, rpc)
        expect_error(
            lambda: method(request("12"), **opts),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="processing_terminal_id",
        )
        print(f"ok: {rpc}(\"12\") is INVALID_ARGUMENT, BadRequest names processing_terminal_id")
        expect_error(lambda: method(request("9999999"), **opts), grpc.StatusCode.NOT_FOUND)
        print(f"ok: {rpc}(\"9999999\") is NOT_FOUND")

    expect_error(
        lambda: stub.CreateSession(
            pb2.CreateSessionRequest(
                processing_terminal_id=terminal,
                scenario=pb2.SCENARIO_PAYMENT,
                idempotency_key="not-a-uuid",
            ),
            **opts,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="idempotency_key",
    )
    print("ok: a malformed idempotency_key is INVALID_ARGUMENT, BadRequest names idempotency_key")


def retry_infos(err):
    status = rich_status(err)
    return [
        retry
        for detail in (status.details if status else [])
        for retry in [unpack(detail, "RetryInfo")]
        if retry is not None
    ]


def check_rate_limit(pb2, stub, terminal, opts):
    """Against a broker whose caller (our token) may make one call a minute:
    a call without the token is UNAUTHENTICATED, and of two calls with it the
    second is RESOURCE_EXHAUSTED with ErrorInfo CALLER_RATE_LIMITED and a
    RetryInfo saying when to come back. Proves the token is sent and that
    RetryInfo decodes."""
    request = pb2.GetBearerTokenRequest(processing_terminal_id=terminal)
    expect_error(
        lambda: stub.GetBearerToken(request, timeout=TIMEOUT), grpc.StatusCode.UNAUTHENTICATED
    )
    print("ok: a call without the caller token is UNAUTHENTICATED")
    last = None
    for attempt in (1, 2):
        try:
            stub.GetBearerToken(request, **opts)
            print(f"call {attempt} with the caller token: OK")
        except grpc.RpcError as err:
            print(f"call {attempt} with the caller token:")
            print("  " + describe_error(err).replace("\n", "\n  "))
            expect(
                err.code() != grpc.StatusCode.UNAUTHENTICATED,
                f"call {attempt} with the caller token is not UNAUTHENTICATED",
            )
            last = err
    expect(
        last is not None and last.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the second call with the caller token is RESOURCE_EXHAUSTED",
    )
    expect(
        any(i.domain == "payroc-broker" and i.reason == "CALLER_RATE_LIMITED" for i in error_infos(last)),
        "it carries ErrorInfo payroc-broker CALLER_RATE_LIMITED",
    )
    expect(
        any(r.retry_delay.ToTimedelta() > datetime.timedelta(0) for r in retry_infos(last)),
        "it carries a RetryInfo with a positive retry_delay",
    )


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def open_channel(target, ca=None, cert=None, key=None):
    """Plaintext (the sandbox's default) without `ca`; else TLS trusting only
    `ca`, presenting the client certificate when given (mTLS: with
    `sandbox --tls`, the certificate is the caller's identity)."""
    if ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(ca),
        private_key=read_file(key) if key else None,
        certificate_chain=read_file(cert) if cert else None,
    )
    return grpc.secure_channel(target, credentials)


def check_certificate_is_the_identity(pb2, pb2_grpc, target, ca, terminal):
    """Over TLS without the client certificate (and without a caller token)
    the broker knows no caller: UNAUTHENTICATED. So the certificate, not the
    connection, is what got the tokens above."""
    with open_channel(target, ca) as channel:
        stub = pb2_grpc.TokenBrokerStub(channel)
        expect_error(
            lambda: stub.GetBearerToken(
                pb2.GetBearerTokenRequest(processing_terminal_id=terminal), timeout=TIMEOUT
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    print("ok: over TLS without the client certificate, GetBearerToken is UNAUTHENTICATED")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="broker address (host:port)")
    parser.add_argument("--terminal", default="1234001", help="processing terminal id")
    parser.add_argument(
        "--caller-token",
        default=os.environ.get("BROKER_CALLER_TOKEN"),
        help="sent as `authorization: Bearer <token>`, needed when the broker has [[callers]] "
        "(default: $BROKER_CALLER_TOKEN; the environment keeps it out of `ps`)",
    )
    parser.add_argument(
        "--check", action="store_true", help="also check the broker's behaviour (against the sandbox)"
    )
    parser.add_argument(
        "--check-rate-limit",
        action="store_true",
        help="only check a broker whose caller (this token) may make 1 call a minute "
        "(see .ci/run): UNAUTHENTICATED without the token, then CALLER_RATE_LIMITED with RetryInfo",
    )
    parser.add_argument(
        "--ca", help="TLS: trust only this CA for the broker's certificate (PEM); without it, plaintext"
    )
    parser.add_argument("--cert", help="TLS: client certificate chain (PEM), the caller's identity")
    parser.add_argument("--key", help="TLS: the client certificate's private key (PEM)")
    args = parser.parse_args()
    if (args.cert is None) != (args.key is None) or (args.cert and not args.ca):
        parser.error("--cert and --key go together, and need --ca")
    if args.check or args.check_rate_limit:
        try:
            import grpc_status  # noqa: F401  (decodes the google.rpc error details)
        except ImportError:
            sys.exit("error: --check needs grpcio-status: python3 -m pip install grpcio-status")

    pb2, pb2_grpc = load_stubs()
    opts = call_options(args.caller_token)
    with open_channel(args.target, args.ca, args.cert, args.key) as channel:
        stub = pb2_grpc.TokenBrokerStub(channel)
        if args.check_rate_limit:
            try:
                check_rate_limit(pb2, stub, args.terminal, opts)
            except CheckFailed as failed:
                sys.exit(f"check FAILED against {args.target}: {failed}")
            print(f"rate-limit check passed against {args.target}")
            return
        try:
            token, session, watched = demo(pb2, stub, args.terminal, opts)
            errors = bad_requests(pb2, stub, args.terminal, session, opts)
            if args.check:
                check(pb2, stub, args.terminal, opts, token, session, watched, errors)
                if args.cert:
                    check_certificate_is_the_identity(pb2, pb2_grpc, args.target, args.ca, args.terminal)
                print(f"check passed against {args.target}")
        except grpc.RpcError as err:
            sys.exit(f"{'check FAILED' if args.check else 'error'}: {describe_error(err)}")
        except CheckFailed as failed:
            sys.exit(f"check FAILED against {args.target}: {failed}")


if __name__ == "__main__":
    main()
