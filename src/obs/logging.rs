//! Log output: text or JSON lines on stderr that never hold up an RPC.
//!
//! Events are formatted on the thread that emits them and queued; one
//! writer thread of its own empties the queue into stderr, a batch per
//! `write`. The queue is bounded ([`MAX_QUEUED_LINES`]): when stderr is slow,
//! full (a pipe nobody reads) or blocked, lines beyond the bound are dropped
//! and counted ([`lines_dropped`], exported as
//! `payroc_broker_log_lines_dropped_total`) instead of making the RPC that
//! logs wait. Lines that stderr refuses (a closed pipe) are counted as
//! dropped too, and never crash the process. On shutdown the [`LogGuard`]
//! gives the writer a moment to write out what is queued.
//!
//! Our own queue rather than `tracing-appender`'s non-blocking writer: that
//! one prints to stdout/stderr with `println!`/`eprintln!` when its shutdown
//! times out or its last flush fails, which panics when those are closed;
//! and it does not count lines lost to write errors.
//!
//! JSON lines are one object each with `timestamp`, `level`, `target`,
//! `message` and the event's fields as top-level keys (and the current span's
//! fields under `span`).

use std::{
    io::{self, Write},
    net::SocketAddr,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::{
    Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    Layer,
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter,
        format::{self},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;
use crate::sync::lock;

/// Lines queued at most (a few MB at typical line lengths).
pub const MAX_QUEUED_LINES: usize = 8192;

/// How long shutdown waits for queued lines to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the writer lets lines gather after writing a batch. Under load a
/// line per RPC would otherwise wake the writer (a futex syscall on the RPC's
/// thread and a context switch) for every line; with the pause it wakes at
/// most about a thousand times a second and writes the lines in between in
/// one `write` (BENCHMARKS.md has the measured effect).
const LINGER: Duration = Duration::from_millis(1);

/// Lines dropped since start, by every queue of the process.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether a JSON formatter was ever installed in this process: only then
/// is pre-rendering an event's fields ([`with_json_fields`]) worth its cost.
static JSON_INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The fields of the event this thread is dispatching, already written
    /// as JSON members by [`with_json_fields`]; `None` outside it.
    static PRERENDERED: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Each thread's buffer for them, kept between events.
    static BUFFER: RefCell<String> = const { RefCell::new(String::new()) };
}

/// What `emit` logs, as the JSON format writes it (to memory, through the
/// layer [`init`] installs), for unit tests of what lines look like.
#[cfg(test)]
pub(crate) fn json_output(emit: impl FnOnce()) -> String {
    use tracing_subscriber::layer::SubscriberExt;
    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<u8>>>);
    impl Write for Memory {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let memory = Memory::default();
    let out = memory.clone();
    let subscriber =
        tracing_subscriber::registry().with(fmt_layer(LogFormat::Json, move || out.clone(), false));
    tracing::subscriber::with_default(subscriber, emit);
    let bytes = lock(&memory.0).clone();
    String::from_utf8(bytes).expect("log lines are UTF-8")
}

/// Whether the JSON formatter ignores pre-rendered members on this thread
/// (tests compare the two routes).
#[cfg(test)]
pub(crate) fn visit_always(yes: bool) {
    VISIT_ALWAYS.with(|v| v.set(yes));
}

#[cfg(test)]
thread_local! {
    /// Makes the formatter ignore pre-rendered members, so a test can
    /// compare both routes.
    static VISIT_ALWAYS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Emits an event (`emit`, which must dispatch exactly one) whose fields
/// `render` writes straight as JSON members, from the typed values the
/// caller holds, in the order the event declares them. The JSON formatter
/// then copies those members instead of visiting the fields one by one
/// through `tracing`'s `Visit` (a `Display` field costs a `fmt` pass into a
/// scratch buffer, then an escaping pass), which made the one audit line per
/// RPC the largest part of a cached call. Every other subscriber and layer
/// (the text format, tests' captures) still sees an ordinary event with
/// every field. A test holds the two routes to the same bytes.
pub fn with_json_fields(render: impl FnOnce(&mut JsonMembers<'_>), emit: impl FnOnce()) {
    if !JSON_INSTALLED.load(Ordering::Relaxed) {
        return emit();
    }
    let mut members = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    members.clear();
    render(&mut JsonMembers { out: &mut members });
    PRERENDERED.with(|p| *p.borrow_mut() = Some(members));
    // Cleared however `emit` ends (a panic included): members left behind
    // would be copied into the next event this thread formats.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            if let Some(mut members) = PRERENDERED.with(|p| p.borrow_mut().take()) {
                members.clear();
                BUFFER.with(|b| *b.borrow_mut() = members);
            }
        }
    }
    let _clear = Clear;
    emit();
}

/// Where [`with_json_fields`]' `render` writes: each call one member,
/// `,"name":value`, as the formatter would have written that field.
pub struct JsonMembers<'a> {
    out: &'a mut String,
}

impl JsonMembers<'_> {
    /// Names are the event's own field names, identifiers that need no
    /// escape.
    fn key(&mut self, name: &str) {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        self.out.push_str(",\"");
        self.out.push_str(name);
        self.out.push_str("\":");
    }

    /// A string field (or a `Display` one whose text is at hand).
    pub fn str(&mut self, name: &str, value: &str) {
        self.key(name);
        let _ = write_json_str(self.out, value);
    }

    /// A socket address, as its `Display` writes it (quoted, and needing no
    /// escape: digits, dots, colons, brackets, a `%` scope).
    pub fn socket_addr(&mut self, name: &str, value: &SocketAddr) {
        self.key(name);
        self.out.push('"');
        write_socket_addr(self.out, value);
        self.out.push('"');
    }

    pub fn u64(&mut self, name: &str, value: u64) {
        self.key(name);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    /// As the formatter writes an `f64` field.
    pub fn f64(&mut self, name: &str, value: f64) {
        self.key(name);
        let _ = write_f64(self.out, value);
    }

    /// `thousandths / 1000` as the formatter writes that `f64` (a duration
    /// in ms from whole µs), without a float formatting pass: the shortest
    /// decimal that reads back as the same `f64` is the exact one with its
    /// trailing zeros cut, and `Debug` keeps one `0` after the point. That
    /// holds while doubles near the value are much closer together than
    /// 0.001: below 2^40 thousandths (12.7 days of µs) they are within
    /// 2^-12; past that, the float route.
    pub fn thousandths(&mut self, name: &str, thousandths: u64) {
        if thousandths >= EXACT_THOUSANDTHS {
            return self.f64(name, thousandths as f64 / 1000.0);
        }
        self.key(name);
        let (whole, frac) = (thousandths / 1000, thousandths % 1000);
        self.out.push_str(itoa::Buffer::new().format(whole));
        self.out.push('.');
        let mut digits = [b'0'; 3];
        put_digits(&mut digits, frac);
        let kept = digits.iter().rposition(|&d| d != b'0').map_or(1, |i| i + 1);
        self.out.push_str(ascii(&digits[..kept]));
    }
}

/// `n`'s last `dst.len()` decimal digits, zero-padded, into `dst`.
fn put_digits(dst: &mut [u8], mut n: u64) {
    for d in dst.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Digits written by [`put_digits`] (and the ASCII around them), as text.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("ASCII digits")
}

/// `addr` as `Display` writes it. IPv4, which every audit line of a
/// loopback, pod or node peer holds, without a `core::fmt` pass (that pass
/// was a quarter of the line's cost in the profile); IPv6 (whose zero-run
/// rules are long) through `Display`.
fn write_socket_addr(out: &mut String, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(n.format(octet));
            }
            out.push(':');
            out.push_str(n.format(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// See [`JsonMembers::thousandths`].
const EXACT_THOUSANDTHS: u64 = 1 << 40;

/// Log lines dropped since the process started (queue full, or stderr
/// refused them).
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Installs the global subscriber: `format` lines on stderr, filtered by
/// `RUST_LOG` (default `info`). Keep the guard until exit: dropping it
/// flushes.
pub fn init(format: LogFormat) -> LogGuard {
    let queue = Queue::spawn(io::stderr(), MAX_QUEUED_LINES);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = format == LogFormat::Text && io::IsTerminal::is_terminal(&io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format, QueueWriter(Arc::clone(&queue)), ansi))
        .init();
    LogGuard(queue)
}

/// The formatting layer for `format`, writing to `writer`: what [`init`]
/// installs (tests install it over a writer of their own).
pub fn fmt_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        // Its default reports a failed write with eprintln!, which panics when
        // stderr is a closed pipe (the queue never fails, but stay safe).
        .log_internal_errors(false);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        LogFormat::Json => {
            JSON_INSTALLED.store(true, Ordering::Relaxed);
            layer
                .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                .event_format(JsonLine)
                .boxed()
        }
    }
}

/// Flushes the log queue when dropped (bounded wait).
pub struct LogGuard(Arc<Queue>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.flush(FLUSH_TIMEOUT);
    }
}

/// The bounded queue between the emitting threads and the writer thread.
pub struct Queue {
    state: Mutex<State>,
    /// Signalled when lines are queued.
    queued: Condvar,
    /// Signalled when the writer has taken and written a batch.
    written: Condvar,
    limit: usize,
}

#[derive(Default)]
struct State {
    /// The queued lines, end to end: one buffer rather than one per line, so
    /// a line costs a copy and no allocation. The writer swaps it for the
    /// (emptied) buffer it wrote last, so both keep their capacity.
    lines: Vec<u8>,
    /// How many lines `lines` holds.
    queued: usize,
    /// Lines accepted into the queue so far.
    accepted: u64,
    /// Lines the writer has finished with (written or failed).
    done: u64,
    /// The writer waits for lines: only then does a push wake it.
    writer_idle: bool,
    /// Callers of [`Queue::flush`] waiting: only then does a batch signal.
    flushers: usize,
}

impl Queue {
    /// A queue of at most `limit` lines and its writer thread, writing to
    /// `out`.
    pub fn spawn(out: impl Write + Send + 'static, limit: usize) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            queued: Condvar::new(),
            written: Condvar::new(),
            limit,
        });
        let q = Arc::clone(&queue);
        // If the thread cannot start, lines pile up to the bound and are
        // then dropped and counted: logging still never blocks.
        let _ = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || q.write_forever(out));
        queue
    }

    /// Queues one line, or drops and counts it when the queue is full.
    pub fn push(&self, line: &[u8]) {
        let mut s = lock(&self.state);
        if s.queued >= self.limit {
            drop(s);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        s.lines.extend_from_slice(line);
        s.queued += 1;
        s.accepted += 1;
        // std's condvar makes a syscall on every notify, waiter or not.
        let wake = std::mem::take(&mut s.writer_idle);
        drop(s);
        if wake {
            self.queued.notify_one();
        }
    }

    fn write_forever(&self, mut out: impl Write) {
        let mut batch = Vec::with_capacity(64 * 1024);
        loop {
            let n = {
                let mut s = lock(&self.state);
                while s.queued == 0 {
                    s.writer_idle = true;
                    s = self.queued.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                s.writer_idle = false;
                std::mem::swap(&mut s.lines, &mut batch);
                std::mem::take(&mut s.queued) as u64
            };
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                // Closed or broken: these lines are lost, and counted.
                DROPPED.fetch_add(n, Ordering::Relaxed);
            }
            batch.clear();
            // Do not keep a burst's worth of memory for ever.
            if batch.capacity() > 1024 * 1024 {
                batch = Vec::with_capacity(64 * 1024);
            }
            let mut s = lock(&self.state);
            s.done += n;
            let flushers = s.flushers;
            drop(s);
            if flushers > 0 {
                self.written.notify_all();
            }
            std::thread::sleep(LINGER);
        }
    }

    /// Waits until every line queued before this call has been written, or
    /// `timeout` passed (stderr blocked). Returns whether it got there.
    pub fn flush(&self, timeout: Duration) -> bool {
        let mut s = lock(&self.state);
        let target = s.accepted;
        s.flushers += 1;
        let (mut s, _) = self
            .written
            .wait_timeout_while(s, timeout, |s| s.done < target)
            .unwrap_or_else(PoisonError::into_inner);
        s.flushers -= 1;
        s.done >= target
    }
}

/// Queues whatever one formatted event writes (the fmt layer writes each
/// event with one `write_all`).
#[derive(Clone)]
pub struct QueueWriter(pub Arc<Queue>);

impl Write for QueueWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = QueueWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// JSON lines as tracing-subscriber's `json().flatten_event(true)
/// .with_current_span(true)` writes them (`timestamp`, `level`, the event's
/// fields with `message` among them, `target`, then the current span's fields
/// and `name` under `span`), written straight into the line: its formatter
/// turns every `Display` field into a `String` of its own before escaping it
/// and parses the span's stored fields back from JSON for every line, which
/// made the one audit line per RPC the costliest part of a cached
/// GetBearerToken (BENCHMARKS.md has the profile and the effect).
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        w.write_str("{\"timestamp\":\"")?;
        // A log line's own timestamp, not logic: the wall clock is what it is for.
        #[allow(clippy::disallowed_methods)]
        let now = std::time::SystemTime::now();
        write_rfc3339(&mut w, now)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_char('"')?;
        // Members pre-rendered by with_json_fields for this very event, if
        // any (it dispatches exactly one); otherwise visit the fields.
        let prerendered = PRERENDERED.with(|p| match &*p.borrow() {
            #[cfg(test)]
            Some(_) if VISIT_ALWAYS.with(std::cell::Cell::get) => Ok(false),
            Some(members) => w.write_str(members).map(|()| true),
            None => Ok(false),
        })?;
        if !prerendered {
            let mut fields = JsonFieldsOf {
                w: &mut w,
                scratch: String::new(),
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
        }
        w.write_str(",\"target\":")?;
        write_json_str(&mut w, meta.target())?;
        if let Some(span) = ctx.lookup_current() {
            w.write_str(",\"span\":{")?;
            let ext = span.extensions();
            // JsonFields stores a span's fields as one JSON object: its
            // members go in as they are.
            if let Some(stored) = ext.get::<FormattedFields<N>>() {
                let inner = stored
                    .fields
                    .trim()
                    .trim_start_matches('{')
                    .trim_end_matches('}');
                if !inner.is_empty() {
                    w.write_str(inner)?;
                    w.write_char(',')?;
                }
            }
            w.write_str("\"name\":")?;
            write_json_str(&mut w, span.name())?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFieldsOf<'a, 'w> {
    w: &'a mut format::Writer<'w>,
    /// Reused for values only `Debug` can give.
    scratch: String,
    result: fmt::Result,
}

impl JsonFieldsOf<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.w.write_char(',')?;
        write_json_str(self.w, field.name())?;
        self.w.write_char(':')
    }

    fn put(&mut self, field: &Field, value: impl FnOnce(&mut Self) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self));
        }
    }
}

impl Visit for JsonFieldsOf<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |s| write_json_str(s.w, value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |s| write!(s.w, "{value}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |s| s.w.write_str(itoa::Buffer::new().format(value)));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |s| s.w.write_str(itoa::Buffer::new().format(value)));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, |s| write_f64(s.w, value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |s| {
            s.scratch.clear();
            write!(s.scratch, "{value:?}")?;
            write_json_str(s.w, &s.scratch)
        });
    }
}

/// `value` as serde_json writes it: non-finite numbers are null.
fn write_f64(w: &mut impl fmt::Write, value: f64) -> fmt::Result {
    match value.is_finite() {
        true => write!(w, "{value:?}"),
        false => w.write_str("null"),
    }
}

/// `s` as a JSON string, escaped as serde_json escapes.
fn write_json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    // Most values need no escape: one write, not one per run of bytes.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        w.write_str(s)?;
        return w.write_char('"');
    }
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        w.write_str(&s[from..i])?;
        match esc {
            "" => write!(w, "\\u{b:04x}")?,
            esc => w.write_str(esc)?,
        }
        from = i + 1;
    }
    w.write_str(&s[from..])?;
    w.write_char('"')
}

/// `t` as RFC 3339 in UTC with microseconds (`2026-11-29T02:29:12.344756Z`),
/// as tracing-subscriber writes it.
///
/// Digits put into a fixed pattern rather than through `write!`: a line per
/// RPC, and seven padded integers cost a `core::fmt` pass each.
fn write_rfc3339(w: &mut impl fmt::Write, t: std::time::SystemTime) -> fmt::Result {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::clock::civil_from_days(days as i64);
    // Days count from the epoch, so the year is at least 1970; RFC 3339
    // years have four digits.
    let year = year.clamp(0, 9999) as u64;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month.into());
    put_digits(&mut out[8..10], day.into());
    put_digits(&mut out[11..13], rem / 3600);
    put_digits(&mut out[14..16], rem / 60 % 60);
    put_digits(&mut out[17..19], rem % 60);
    put_digits(&mut out[20..26], d.subsec_micros().into());
    w.write_str(ascii(&out))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pre_rendered_members_do_not_outlive_a_panicking_emit() {
        JSON_INSTALLED.store(true, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(|| {
            with_json_fields(|m| m.str("a", "b"), || panic!("emit fails"));
        });
        assert!(outcome.is_err());
        assert!(PRERENDERED.with(|p| p.borrow().is_none()));
    }

    #[test]
    fn thousandths_are_written_as_the_f64_formatter_writes_them() {
        let mut values: Vec<u64> = vec![0, 1, 9, 10, 99, 100, 999, 1000, 1001, 1010, 1100];
        // A spread of magnitudes, up to where the exact route ends.
        let mut v = 7u64;
        while v < 1 << 56 {
            values.extend([v, v + 1, v * 10]);
            v = v * 13 + 5;
        }
        values.extend([
            EXACT_THOUSANDTHS - 1,
            EXACT_THOUSANDTHS,
            EXACT_THOUSANDTHS + 17,
        ]);
        for m in values {
            let mut out = String::new();
            JsonMembers { out: &mut out }.thousandths("d", m);
            let mut expected = String::new();
            write_f64(&mut expected, m as f64 / 1000.0).unwrap();
            assert_eq!(out, format!(",\"d\":{expected}"), "{m} thousandths");
        }
    }

    use super::*;
    use std::sync::mpsc;

    #[test]
    fn timestamps_are_written_as_format_writes_them() {
        use std::time::{Duration, UNIX_EPOCH};
        let mut secs: u64 = 0;
        let mut micros: u32 = 0;
        // From the epoch to past 2100 (leap days, the century), with the
        // microseconds' every width.
        while secs < 4_200_000_000 {
            let t = UNIX_EPOCH + Duration::new(secs, micros * 1000);
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            let (days, rem) = (secs / 86_400, secs % 86_400);
            let (year, month, day) = crate::clock::civil_from_days(days as i64);
            let expected = format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3600,
                rem / 60 % 60,
                rem % 60,
                d.subsec_micros()
            );
            let mut out = String::new();
            write_rfc3339(&mut out, t).unwrap();
            assert_eq!(out, expected);
            secs = secs * 3 + 86_399;
            micros = (micros * 7 + 13) % 1_000_000;
        }
    }

    #[test]
    fn socket_addrs_are_written_as_display_writes_them() {
        for addr in [
            "127.0.0.1:4711",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.1.20.203:9",
            "[::1]:50051",
            "[2001:db8::8a2e:370:7334]:443",
            "[fe80::1%3]:80",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = String::new();
            write_socket_addr(&mut out, &addr);
            assert_eq!(out, addr.to_string());
        }
    }

    /// A writer that says when a write begins, blocks until told to go on,
    /// then records.
    struct Gated {
        entered: mpsc::Sender<()>,
        gate: mpsc::Receiver<()>,
        out: Arc<Mutex<Vec<u8>>>,
    }
    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.gate.recv();
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_writer_costs_dropped_lines_not_waiting() {
        let (open, gate) = mpsc::channel();
        let (entered, writing) = mpsc::channel();
        let out = Arc::new(Mutex::new(Vec::new()));
        let q = Queue::spawn(
            Gated {
                entered,
                gate,
                out: Arc::clone(&out),
            },
            4,
        );
        let before = lines_dropped();
        // The writer takes the first line and blocks writing it; four more
        // fill the queue; the rest are dropped at once.
        q.push(b"first\n");
        writing.recv().unwrap();
        for i in 0..10 {
            q.push(format!("line {i}\n").as_bytes());
        }
        // (Other tests of this binary may drop lines too: at least ours.)
        assert!(lines_dropped() - before >= 6);
        for _ in 0..3 {
            let _ = open.send(());
        }
        assert!(q.flush(Duration::from_secs(10)));
        let written = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "first\nline 0\nline 1\nline 2\nline 3\n");
    }

    fn json_lines(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        json_output(emit)
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    }

    #[test]
    fn json_lines_flatten_fields_escape_values_and_carry_the_span() {
        let lines = json_lines(|| {
            let span = tracing::info_span!("rpc", rpc = "GetBearerToken", n = 3);
            let _in = span.enter();
            tracing::info!(
                target: "t::x",
                caller = tracing::field::display("a \"q\" \\ \n\u{1}é"),
                terminal = "T1",
                code = tracing::field::display("OK"),
                upstream_status = 201u16,
                duration_ms = 0.25f64,
                whole = 2.0f64,
                ok = true,
                neg = -4i64,
                "rpc"
            );
            drop(_in);
            tracing::warn!("outside");
        });
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["message"], "rpc");
        assert_eq!(l["target"], "t::x");
        assert_eq!(l["caller"], "a \"q\" \\ \n\u{1}é");
        assert_eq!(l["terminal"], "T1");
        assert_eq!(l["code"], "OK");
        assert_eq!(l["upstream_status"], 201);
        assert_eq!(l["duration_ms"], 0.25);
        assert_eq!(l["whole"], 2.0);
        assert_eq!(l["ok"], true);
        assert_eq!(l["neg"], -4);
        assert_eq!(
            l["span"],
            serde_json::json!({"rpc": "GetBearerToken", "n": 3, "name": "rpc"})
        );
        let ts = l["timestamp"].as_str().unwrap();
        assert_eq!(
            (ts.len(), &ts[4..5], &ts[10..11], &ts[26..]),
            (27, "-", "T", "Z")
        );
        assert!(lines[1].get("span").is_none());
        assert_eq!(lines[1]["level"], "WARN");
    }

    #[test]
    fn rfc3339_dates_match_the_calendar() {
        let at = |secs: u64, micros: u32| {
            let mut s = String::new();
            let t = std::time::UNIX_EPOCH
                + Duration::from_secs(secs)
                + Duration::from_micros(micros.into());
            write_rfc3339(&mut s, t).unwrap();
            s
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_746_552, 344_756), "2026-11-27T02:29:12.344756Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }

    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_closed_stderr_refuses_are_counted() {
        let q = Queue::spawn(Closed, 16);
        let before = lines_dropped();
        q.push(b"a\n");
        q.push(b"b\n");
        assert!(q.flush(Duration::from_secs(10)));
        assert!(lines_dropped() - before >= 2);
    }
}
