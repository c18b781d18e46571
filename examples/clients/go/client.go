// Command client is a small Go client for payroc-broker's TokenBroker gRPC API.
//
// It asks for a Bearer token and a Hosted Fields session token for one
// processing terminal and prints them with the secrets masked, takes the
// current token from WatchBearerToken, then sends two deliberately bad
// requests and prints the rich error details (google.rpc BadRequest,
// ErrorInfo, RetryInfo) decoded from the `grpc-status-details-bin` trailer.
//
// The stubs are generated from proto/ by run.sh next to this file (nothing
// generated is checked in), which then runs this program:
//
//	payroc-broker sandbox --listen 127.0.0.1:50051 &
//	bash examples/clients/go/run.sh -target 127.0.0.1:50051 -terminal 1234001
//
// With -check it also checks the answers (against `payroc-broker sandbox`)
// and exits non-zero on the first thing that is wrong. With -check-rate-limit
// it only checks a broker whose caller (this token) may make one call a
// minute, as .ci/run starts: UNAUTHENTICATED without the token, then
// CALLER_RATE_LIMITED with RetryInfo.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	brokerv1 "payroc-broker/gen/payroc/broker/v1"
)

// deadline bounds every call.
const deadline = 5 * time.Second

// sandboxCredentials: the sandbox's demo terminals and the credential that
// serves each.
var sandboxCredentials = map[string]string{"1234001": "demo", "1234002": "demo", "5678001": "demo-eu"}

var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// mask never prints a whole token: its first 4 characters tell two apart.
func mask(secret string) string {
	if secret == "" {
		return "(empty)"
	}
	if len(secret) <= 4 {
		return "…"
	}
	return secret[:4] + "…"
}

// describeError is the status code, message and google.rpc details of a
// failed call.
func describeError(err error) string {
	st := status.Convert(err)
	lines := []string{fmt.Sprintf("%s: %s", codeName(st.Code()), st.Message())}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				lines = append(lines, fmt.Sprintf("  field %s: %s", v.GetField(), v.GetDescription()))
			}
		case *errdetails.ErrorInfo:
			lines = append(lines, fmt.Sprintf("  error info: %s %s %v", d.GetDomain(), d.GetReason(), d.GetMetadata()))
		case *errdetails.RetryInfo:
			lines = append(lines, fmt.Sprintf("  retry after %s", d.GetRetryDelay().AsDuration()))
		case error:
			// A detail whose type this program does not link in.
			lines = append(lines, fmt.Sprintf("  undecodable detail: %v", d))
		default:
			lines = append(lines, fmt.Sprintf("  detail %T", d))
		}
	}
	return strings.Join(lines, "\n")
}

// codeName is the canonical upper-case name (INVALID_ARGUMENT), as the other
// examples print it.
func codeName(c codes.Code) string {
	if c == codes.OK {
		return "OK"
	}
	var b strings.Builder
	for i, r := range c.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

func violationFields(err error) []string {
	var fields []string
	for _, detail := range status.Convert(err).Details() {
		if d, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range d.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	return fields
}

func errorInfos(err error) []*errdetails.ErrorInfo {
	var infos []*errdetails.ErrorInfo
	for _, detail := range status.Convert(err).Details() {
		if d, ok := detail.(*errdetails.ErrorInfo); ok {
			infos = append(infos, d)
		}
	}
	return infos
}

type results struct {
	token     *brokerv1.GetBearerTokenResponse
	session   *brokerv1.CreateSessionResponse
	watched   *brokerv1.GetBearerTokenResponse
	tooShort  error
	reusedKey error
}

// callContext carries the deadline and, when given, the caller token as
// `authorization: Bearer <token>`.
func callContext(callerToken string) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	if callerToken != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+callerToken)
	}
	return ctx, cancel
}

func demo(stub brokerv1.TokenBrokerClient, terminal, callerToken string) (*results, error) {
	r := &results{}
	ctx, cancel := callContext(callerToken)
	defer cancel()

	var err error
	r.token, err = stub.GetBearerToken(ctx, &brokerv1.GetBearerTokenRequest{ProcessingTerminalId: terminal})
	if err != nil {
		return nil, err
	}
	fmt.Printf("GetBearerToken(%s)\n", terminal)
	fmt.Printf("  token_type   %s\n", r.token.GetTokenType())
	fmt.Printf("  access_token %s\n", mask(r.token.GetAccessToken()))
	fmt.Printf("  credential   %s\n", r.token.GetCredential())
	fmt.Printf("  expires_at   %s\n", r.token.GetExpiresAt().AsTime().Format(time.RFC3339))
	fmt.Printf("  scopes       %s\n", strings.Join(r.token.GetScopes(), " "))

	r.session, err = stub.CreateSession(ctx, &brokerv1.CreateSessionRequest{
		ProcessingTerminalId: terminal,
		Scenario:             brokerv1.Scenario_SCENARIO_PAYMENT,
	})
	if err != nil {
		return nil, err
	}
	fmt.Printf("CreateSession(%s, SCENARIO_PAYMENT)\n", terminal)
	fmt.Printf("  session_token   %s\n", mask(r.session.GetSessionToken()))
	fmt.Printf("  idempotency_key %s\n", r.session.GetIdempotencyKey())
	fmt.Printf("  lib_version     %s\n", r.session.GetLibVersion())
	fmt.Printf("  expires_at      %s\n", r.session.GetExpiresAt().AsTime().Format(time.RFC3339))

	// A long-lived client keeps calling Recv: the first message is the
	// current token, each later one replaces it before it runs out. Here only
	// the first is taken, then the stream is cancelled.
	watchCtx, stopWatching := context.WithCancel(ctx)
	watch, err := stub.WatchBearerToken(watchCtx, &brokerv1.WatchBearerTokenRequest{ProcessingTerminalId: terminal})
	if err == nil {
		r.watched, err = watch.Recv()
	}
	stopWatching()
	if err != nil {
		return nil, err
	}
	fmt.Printf("WatchBearerToken(%s): first message\n", terminal)
	fmt.Printf("  access_token %s\n", mask(r.watched.GetAccessToken()))
	fmt.Printf("  expires_at   %s\n", r.watched.GetExpiresAt().AsTime().Format(time.RFC3339))

	// Deliberately bad: a terminal id that is too short (the broker's own
	// BadRequest), and an idempotency key reused for another request
	// (Payroc's 409, carried as ErrorInfo).
	_, r.tooShort = stub.GetBearerToken(ctx, &brokerv1.GetBearerTokenRequest{ProcessingTerminalId: "12"})
	_, r.reusedKey = stub.CreateSession(ctx, &brokerv1.CreateSessionRequest{
		ProcessingTerminalId: terminal,
		Scenario:             brokerv1.Scenario_SCENARIO_TOKENIZATION,
		IdempotencyKey:       r.session.GetIdempotencyKey(),
	})
	for _, bad := range []struct {
		label string
		err   error
	}{
		{`GetBearerToken with processing_terminal_id "12"`, r.tooShort},
		{"CreateSession reusing an idempotency_key for another scenario", r.reusedKey},
	} {
		fmt.Printf("%s:\n", bad.label)
		if bad.err == nil {
			fmt.Println("  unexpectedly succeeded")
		} else {
			fmt.Printf("  %s\n", strings.ReplaceAll(describeError(bad.err), "\n", "\n  "))
		}
	}
	return r, nil
}

var errCheck = errors.New("check FAILED")

func expect(condition bool, what string) error {
	if !condition {
		return fmt.Errorf("%w: %s", errCheck, what)
	}
	fmt.Printf("ok: %s\n", what)
	return nil
}

func contains(list []string, want string) bool {
	for _, s := range list {
		if s == want {
			return true
		}
	}
	return false
}

func check(terminal string, r *results) error {
	now := time.Now()
	reusedKeyInfo := false
	for _, info := range errorInfos(r.reusedKey) {
		_, hasStatus := info.GetMetadata()["status"]
		if info.GetDomain() == "payroc.com" && info.GetReason() == "IDEMPOTENCY_KEY_IN_USE" && hasStatus {
			reusedKeyInfo = true
		}
	}
	checks := []struct {
		ok   bool
		what string
	}{
		{r.token.GetTokenType() == "Bearer", `token_type is "Bearer"`},
		{r.token.GetAccessToken() != "", "access_token is not empty"},
		{r.token.GetExpiresAt().AsTime().After(now), "the Bearer token expires in the future"},
		{r.session.GetProcessingTerminalId() == terminal, "the session names the terminal"},
		{r.session.GetSessionToken() != "", "session_token is not empty"},
		{r.session.GetExpiresAt().AsTime().After(now), "the session token expires in the future"},
		{
			uuidV4.MatchString(r.session.GetIdempotencyKey()),
			fmt.Sprintf("the generated idempotency_key %s is a UUID v4", r.session.GetIdempotencyKey()),
		},
		{
			r.watched.GetAccessToken() == r.token.GetAccessToken() && r.watched.GetCredential() == r.token.GetCredential(),
			"WatchBearerToken starts with the token GetBearerToken returned (one shared cache)",
		},
		{
			status.Code(r.tooShort) == codes.InvalidArgument && contains(violationFields(r.tooShort), "processing_terminal_id"),
			"the short terminal id is INVALID_ARGUMENT with a BadRequest naming processing_terminal_id",
		},
		{
			status.Code(r.reusedKey) == codes.AlreadyExists && reusedKeyInfo,
			"the reused idempotency_key is ALREADY_EXISTS with ErrorInfo payroc.com IDEMPOTENCY_KEY_IN_USE",
		},
	}
	if name, ok := sandboxCredentials[terminal]; ok {
		checks = append(checks, struct {
			ok   bool
			what string
		}{r.token.GetCredential() == name, fmt.Sprintf("terminal %s is served by credential %q", terminal, name)})
	}
	for _, c := range checks {
		if err := expect(c.ok, c.what); err != nil {
			return err
		}
	}
	return nil
}

// checkRateLimit runs against a broker whose caller (our token) may make one
// call a minute: a call without the token is UNAUTHENTICATED, and of two
// calls with it the second is RESOURCE_EXHAUSTED with ErrorInfo
// CALLER_RATE_LIMITED and a RetryInfo saying when to come back. Proves the
// token is sent and that RetryInfo decodes.
func checkRateLimit(stub brokerv1.TokenBrokerClient, terminal, callerToken string) error {
	request := &brokerv1.GetBearerTokenRequest{ProcessingTerminalId: terminal}
	anonymous, cancel := callContext("")
	defer cancel()
	_, err := stub.GetBearerToken(anonymous, request)
	if err := expect(status.Code(err) == codes.Unauthenticated, "a call without the caller token is UNAUTHENTICATED"); err != nil {
		return err
	}
	var last error
	for attempt := 1; attempt <= 2; attempt++ {
		ctx, cancel := callContext(callerToken)
		_, last = stub.GetBearerToken(ctx, request)
		cancel()
		fmt.Printf("call %d with the caller token:\n", attempt)
		if last == nil {
			fmt.Println("  OK")
			continue
		}
		fmt.Printf("  %s\n", strings.ReplaceAll(describeError(last), "\n", "\n  "))
		if err := expect(status.Code(last) != codes.Unauthenticated,
			fmt.Sprintf("call %d with the caller token is not UNAUTHENTICATED", attempt)); err != nil {
			return err
		}
	}
	limited, retry := false, false
	for _, detail := range status.Convert(last).Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			limited = limited || (d.GetDomain() == "payroc-broker" && d.GetReason() == "CALLER_RATE_LIMITED")
		case *errdetails.RetryInfo:
			retry = retry || d.GetRetryDelay().AsDuration() > 0
		}
	}
	for _, c := range []struct {
		ok   bool
		what string
	}{
		{status.Code(last) == codes.ResourceExhausted, "the second call with the caller token is RESOURCE_EXHAUSTED"},
		{limited, "it carries ErrorInfo payroc-broker CALLER_RATE_LIMITED"},
		{retry, "it carries a RetryInfo with a positive retry_delay"},
	} {
		if err := expect(c.ok, c.what); err != nil {
			return err
		}
	}
	return nil
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "broker address (host:port)")
	terminal := flag.String("terminal", "1234001", "processing terminal id")
	callerToken := flag.String("caller-token", os.Getenv("BROKER_CALLER_TOKEN"),
		"sent as `authorization: Bearer <token>`, needed when the broker has [[callers]] "+
			"(default: $BROKER_CALLER_TOKEN; the environment keeps it out of `ps`)")
	checkMode := flag.Bool("check", false, "also check the broker's behaviour (against the sandbox)")
	checkRateLimitMode := flag.Bool("check-rate-limit", false,
		"only check a broker whose caller (this token) may make 1 call a minute (see .ci/run): "+
			"UNAUTHENTICATED without the token, then CALLER_RATE_LIMITED with RetryInfo")
	flag.Parse()

	prefix := "error"
	if *checkMode || *checkRateLimitMode {
		prefix = "check FAILED"
	}
	// Plaintext, as the sandbox serves; use grpc.WithTransportCredentials
	// (credentials.NewTLS) with [server.tls].
	conn, err := grpc.Dial(*target, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", prefix, err)
		os.Exit(1)
	}
	defer conn.Close()

	stub := brokerv1.NewTokenBrokerClient(conn)
	if *checkRateLimitMode {
		err = checkRateLimit(stub, *terminal, *callerToken)
	} else {
		var r *results
		r, err = demo(stub, *terminal, *callerToken)
		if err == nil && *checkMode {
			err = check(*terminal, r)
		}
	}
	if err != nil {
		if errors.Is(err, errCheck) {
			fmt.Fprintf(os.Stderr, "%v (against %s)\n", err, *target)
		} else {
			fmt.Fprintf(os.Stderr, "%s: %s\n", prefix, describeError(err))
		}
		conn.Close()
		os.Exit(1)
	}
	if *checkRateLimitMode {
		fmt.Printf("rate-limit check passed against %s\n", *target)
	} else if *checkMode {
		fmt.Printf("check passed against %s\n", *target)
	}
}
