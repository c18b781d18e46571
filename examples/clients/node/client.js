#!/usr/bin/env node
// A small Node.js client for payroc-broker's TokenBroker gRPC API.
//
// Loads proto/ at run time with @grpc/proto-loader (nothing generated is
// checked in), asks for a Bearer token and a Hosted Fields session token for
// one processing terminal and prints them with the secrets masked, takes the
// current token from WatchBearerToken, then sends two deliberately bad
// requests and prints the rich error details (google.rpc BadRequest,
// ErrorInfo, RetryInfo) decoded from the `grpc-status-details-bin` trailer.
//
//   cd examples/clients/node && npm ci
//   payroc-broker sandbox --listen 127.0.0.1:50051 &
//   node client.js --target 127.0.0.1:50051 --terminal 1234001
//
// With --check it also asserts the answers (against `payroc-broker sandbox`)
// and exits non-zero on the first thing that is wrong. With --check-rate-limit
// it only checks a broker whose caller (this token) may make one call a
// minute, as .ci/run starts: UNAUTHENTICATED without the token, then
// CALLER_RATE_LIMITED with RetryInfo.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..', '..');
const DEADLINE_MS = 5000;
// The sandbox's demo terminals and the credential that serves each.
const SANDBOX_CREDENTIALS = { 1234001: 'demo', 1234002: 'demo', 5678001: 'demo-eu' };

// --- stubs -------------------------------------------------------------------

function loadService() {
  const definition = protoLoader.loadSync('payroc/broker/v1/token_broker.proto', {
    includeDirs: [path.join(REPO, 'proto')],
    keepCase: true, // field names as in the proto: processing_terminal_id
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).payroc.broker.v1.TokenBroker;
}

// google.rpc.Status and the detail messages, from the vendored googleapis
// protos (google/protobuf/any.proto and duration.proto are built into
// protobufjs).
function loadErrorTypes() {
  const root = new protobuf.Root();
  const googleapis = path.join(REPO, 'third_party', 'googleapis');
  root.resolvePath = (origin, target) =>
    target.startsWith('google/rpc/') ? path.join(googleapis, target) : target;
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return root;
}

// --- rich error details ------------------------------------------------------

// [{type, value}] for each google.protobuf.Any in the error's google.rpc.Status.
function richDetails(errorTypes, err) {
  const raw = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (raw.length === 0) return [];
  const Status = errorTypes.lookupType('google.rpc.Status');
  const status = Status.decode(raw[0]);
  return status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    let type;
    try {
      type = errorTypes.lookupType(typeName);
    } catch {
      return { type: typeName, value: null }; // a detail type this client does not know
    }
    return { type: typeName, value: type.toObject(type.decode(any.value), { longs: String, defaults: true }) };
  });
}

function describeError(errorTypes, err) {
  const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
  const lines = [`${code}: ${err.details}`];
  for (const { type, value } of richDetails(errorTypes, err)) {
    if (type === 'google.rpc.BadRequest') {
      for (const v of value.field_violations) lines.push(`  field ${v.field}: ${v.description}`);
    } else if (type === 'google.rpc.ErrorInfo') {
      lines.push(`  error info: ${value.domain} ${value.reason} ${JSON.stringify(value.metadata)}`);
    } else if (type === 'google.rpc.RetryInfo') {
      const d = value.retry_delay || {};
      lines.push(`  retry after ${Number(d.seconds || 0) + (d.nanos || 0) / 1e9}s`);
    } else {
      lines.push(`  detail ${type}`);
    }
  }
  return lines.join('\n');
}

// --- calls -------------------------------------------------------------------

function mask(secret) {
  return secret ? `${secret.slice(0, 4)}…` : '(empty)';
}

function when(ts) {
  return new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6));
}

function callOptions() {
  return { deadline: Date.now() + DEADLINE_MS };
}

function unary(stub, method, request, metadata) {
  return new Promise((resolve, reject) => {
    stub[method](request, metadata, callOptions(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// The first message of WatchBearerToken (the current token), then cancels:
// a long-lived client would keep reading, one message per replacement token.
function firstWatched(stub, request, metadata) {
  return new Promise((resolve, reject) => {
    const call = stub.WatchBearerToken(request, metadata, callOptions());
    let first = null;
    call.on('data', (token) => {
      if (first === null) {
        first = token;
        call.cancel();
        resolve(token);
      }
    });
    call.on('error', (err) => {
      if (first === null) reject(err); // after cancel() a CANCELLED error is expected
    });
    call.on('end', () => {
      if (first === null) reject(new Error('WatchBearerToken ended without sending a token'));
    });
  });
}

// Runs `call`, which must fail; returns the error.
async function failure(call) {
  try {
    await call();
  } catch (err) {
    return err;
  }
  return null;
}

async function demo(stub, errorTypes, terminal, metadata) {
  const token = await unary(stub, 'GetBearerToken', { processing_terminal_id: terminal }, metadata);
  console.log(`GetBearerToken(${terminal})`);
  console.log(`  token_type   ${token.token_type}`);
  console.log(`  access_token ${mask(token.access_token)}`);
  console.log(`  credential   ${token.credential}`);
  console.log(`  expires_at   ${when(token.expires_at).toISOString()}`);
  console.log(`  scopes       ${token.scopes.join(' ')}`);

  const session = await unary(
    stub,
    'CreateSession',
    { processing_terminal_id: terminal, scenario: 'SCENARIO_PAYMENT' },
    metadata,
  );
  console.log(`CreateSession(${terminal}, SCENARIO_PAYMENT)`);
  console.log(`  session_token   ${mask(session.session_token)}`);
  console.log(`  idempotency_key ${session.idempotency_key}`);
  console.log(`  lib_version     ${session.lib_version}`);
  console.log(`  expires_at      ${when(session.expires_at).toISOString()}`);

  const watched = await firstWatched(stub, { processing_terminal_id: terminal }, metadata);
  console.log(`WatchBearerToken(${terminal}): first message`);
  console.log(`  access_token ${mask(watched.access_token)}`);
  console.log(`  expires_at   ${when(watched.expires_at).toISOString()}`);

  // Deliberately bad: a terminal id that is too short (the broker's own
  // BadRequest), and an idempotency key reused for another request
  // (Payroc's 409, carried as ErrorInfo).
  const tooShort = await failure(() => unary(stub, 'GetBearerToken', { processing_terminal_id: '12' }, metadata));
  const reusedKey = await failure(() =>
    unary(
      stub,
      'CreateSession',
      {
        processing_terminal_id: terminal,
        scenario: 'SCENARIO_TOKENIZATION',
        idempotency_key: session.idempotency_key,
      },
      metadata,
    ),
  );
  for (const [label, err] of [
    ['GetBearerToken with processing_terminal_id "12"', tooShort],
    ['CreateSession reusing an idempotency_key for another scenario', reusedKey],
  ]) {
    console.log(`${label}:`);
    console.log(err ? `  ${describeError(errorTypes, err).replace(/\n/g, '\n  ')}` : '  unexpectedly succeeded');
  }
  return { token, session, watched, tooShort, reusedKey };
}

// --- --check -----------------------------------------------------------------

class CheckFailed extends Error {}

function expect(condition, what) {
  if (!condition) throw new CheckFailed(what);
  console.log(`ok: ${what}`);
}

function check(errorTypes, terminal, { token, session, watched, tooShort, reusedKey }) {
  const now = new Date();
  expect(token.token_type === 'Bearer', 'token_type is "Bearer"');
  expect(token.access_token !== '', 'access_token is not empty');
  expect(when(token.expires_at) > now, 'the Bearer token expires in the future');
  if (SANDBOX_CREDENTIALS[terminal]) {
    const name = SANDBOX_CREDENTIALS[terminal];
    expect(token.credential === name, `terminal ${terminal} is served by credential "${name}"`);
  }
  expect(session.processing_terminal_id === terminal, 'the session names the terminal');
  expect(session.session_token !== '', 'session_token is not empty');
  expect(when(session.expires_at) > now, 'the session token expires in the future');
  expect(
    /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/.test(session.idempotency_key),
    `the generated idempotency_key ${session.idempotency_key} is a UUID v4`,
  );
  expect(
    watched.access_token === token.access_token && watched.credential === token.credential,
    'WatchBearerToken starts with the token GetBearerToken returned (one shared cache)',
  );
  const details = (err) => (err ? richDetails(errorTypes, err) : []);
  expect(
    tooShort !== null &&
      tooShort.code === grpc.status.INVALID_ARGUMENT &&
      details(tooShort).some(
        (d) =>
          d.type === 'google.rpc.BadRequest' &&
          d.value.field_violations.some((v) => v.field === 'processing_terminal_id'),
      ),
    'the short terminal id is INVALID_ARGUMENT with a BadRequest naming processing_terminal_id',
  );
  expect(
    reusedKey !== null &&
      reusedKey.code === grpc.status.ALREADY_EXISTS &&
      details(reusedKey).some(
        (d) =>
          d.type === 'google.rpc.ErrorInfo' &&
          d.value.domain === 'payroc.com' &&
          d.value.reason === 'IDEMPOTENCY_KEY_IN_USE' &&
          'status' in d.value.metadata,
      ),
    'the reused idempotency_key is ALREADY_EXISTS with ErrorInfo payroc.com IDEMPOTENCY_KEY_IN_USE',
  );
}

// Against a broker whose caller (our token) may make one call a minute: a
// call without the token is UNAUTHENTICATED, and of two calls with it the
// second is RESOURCE_EXHAUSTED with ErrorInfo CALLER_RATE_LIMITED and a
// RetryInfo saying when to come back. Proves the token is sent and that
// RetryInfo decodes.
async function checkRateLimit(stub, errorTypes, terminal, metadata) {
  const request = { processing_terminal_id: terminal };
  const anonymous = await failure(() => unary(stub, 'GetBearerToken', request, new grpc.Metadata()));
  expect(
    anonymous !== null && anonymous.code === grpc.status.UNAUTHENTICATED,
    'a call without the caller token is UNAUTHENTICATED',
  );
  let last = null;
  for (const attempt of [1, 2]) {
    const err = await failure(() => unary(stub, 'GetBearerToken', request, metadata));
    console.log(`call ${attempt} with the caller token:`);
    console.log(err ? `  ${describeError(errorTypes, err).replace(/\n/g, '\n  ')}` : '  OK');
    if (err) {
      expect(err.code !== grpc.status.UNAUTHENTICATED, `call ${attempt} with the caller token is not UNAUTHENTICATED`);
    }
    last = err;
  }
  expect(
    last !== null && last.code === grpc.status.RESOURCE_EXHAUSTED,
    'the second call with the caller token is RESOURCE_EXHAUSTED',
  );
  const details = richDetails(errorTypes, last);
  expect(
    details.some(
      (d) => d.type === 'google.rpc.ErrorInfo' && d.value.domain === 'payroc-broker' && d.value.reason === 'CALLER_RATE_LIMITED',
    ),
    'it carries ErrorInfo payroc-broker CALLER_RATE_LIMITED',
  );
  expect(
    details.some((d) => {
      if (d.type !== 'google.rpc.RetryInfo' || !d.value.retry_delay) return false;
      return Number(d.value.retry_delay.seconds) + d.value.retry_delay.nanos / 1e9 > 0;
    }),
    'it carries a RetryInfo with a positive retry_delay',
  );
}

// --- main --------------------------------------------------------------------

async function main() {
  const { values: args } = parseArgs({
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      terminal: { type: 'string', default: '1234001' },
      // Sent as `authorization: Bearer <token>`, needed when the broker has
      // [[callers]] (default: $BROKER_CALLER_TOKEN; the environment keeps it out of `ps`).
      'caller-token': { type: 'string' },
      check: { type: 'boolean', default: false },
      // Only check a broker whose caller (this token) may make 1 call a
      // minute (see .ci/run): UNAUTHENTICATED without the token, then
      // CALLER_RATE_LIMITED with RetryInfo.
      'check-rate-limit': { type: 'boolean', default: false },
    },
  });
  const TokenBroker = loadService();
  const errorTypes = loadErrorTypes();
  const metadata = new grpc.Metadata();
  const callerToken = args['caller-token'] ?? process.env.BROKER_CALLER_TOKEN;
  if (callerToken) metadata.set('authorization', `Bearer ${callerToken}`);
  // Plaintext, as the sandbox serves; use grpc.credentials.createSsl(ca) with [server.tls].
  const stub = new TokenBroker(args.target, grpc.credentials.createInsecure());
  try {
    if (args['check-rate-limit']) {
      await checkRateLimit(stub, errorTypes, args.terminal, metadata);
      console.log(`rate-limit check passed against ${args.target}`);
      return;
    }
    const results = await demo(stub, errorTypes, args.terminal, metadata);
    if (args.check) {
      check(errorTypes, args.terminal, results);
      console.log(`check passed against ${args.target}`);
    }
  } catch (err) {
    const prefix = args.check || args['check-rate-limit'] ? 'check FAILED' : 'error';
    console.error(err instanceof CheckFailed ? `${prefix} against ${args.target}: ${err.message}` : `${prefix}: ${err.code !== undefined ? describeError(errorTypes, err) : err.stack}`);
    process.exitCode = 1;
  } finally {
    stub.close();
  }
}

main();
