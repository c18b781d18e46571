//! Connection bookkeeping: the table of open connections (with eviction when
//! full), slots per remote address, a rate-limited log line for refused
//! connections, and per-connection activity (open requests) for the idle
//! timeout.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::sync::lock;

/// Every open connection, at most `max`. When the table is full, a new
/// connection takes the place of an open one that serves nobody: one still
/// in its handshake (TLS + HTTP/2 preface), else one with no open request;
/// among those, one of the peer address holding the most connections, its
/// oldest. That one is told to close. Only when every open connection has a
/// request in flight is the new one refused.
///
/// Without this, sockets that send nothing (closed only after
/// `handshake_timeout`) or that complete the preface and then sit idle (closed
/// only after `idle_timeout`), opened from enough addresses to get past
/// `max_connections_per_peer`, fill the table, and health checks and callers
/// are refused until the attacker stops. With it, such sockets only ever
/// evict each other: the addresses holding many connections lose theirs
/// first, so a caller's one connection (which, accepted in a burst, may not
/// have been read yet) is not the one to go.
#[derive(Debug)]
pub struct ConnTable {
    max: usize,
    conns: Mutex<Conns>,
}

#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    /// By id, that is, in order of acceptance.
    open: BTreeMap<u64, Entry>,
    /// Entries of `open` per peer address.
    per_peer: HashMap<IpAddr, usize>,
}

impl Conns {
    /// The connection to evict: see [`ConnTable`].
    fn victim(&self) -> Option<u64> {
        let pick = |evictable: fn(&Entry) -> bool| {
            self.open
                .iter()
                .filter(|(_, e)| evictable(e))
                .max_by_key(|(id, e)| {
                    let held = self.per_peer.get(&e.peer).copied().unwrap_or(0);
                    (held, std::cmp::Reverse(**id))
                })
                .map(|(id, _)| *id)
        };
        pick(|e| e.serving.is_none())
            .or_else(|| pick(|e| e.serving.as_ref().is_some_and(Activity::is_idle)))
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.open.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&e.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&e.peer);
            }
        }
        Some(e)
    }
}

#[derive(Debug)]
struct Entry {
    peer: IpAddr,
    /// `None` while in the handshake; then the connection's requests.
    serving: Option<Activity>,
    evict: Arc<Notify>,
}

/// What [`ConnTable::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    /// There was room.
    Room,
    /// The table was full; this connection took the place of one in its
    /// handshake, or of an idle one.
    Evicted { handshaking: bool },
}

impl ConnTable {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            conns: Mutex::new(Conns::default()),
        })
    }

    /// A place for a new connection, evicting one that serves nobody when
    /// the table is full (see the type's documentation); `None` when every
    /// open connection has a request in flight.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<(ConnSlot, Admitted)> {
        let peer = peer_key(peer);
        let mut conns = lock(&self.conns);
        let mut admitted = Admitted::Room;
        if conns.open.len() >= self.max {
            let victim = conns.victim()?;
            let evicted = conns.remove(victim)?;
            evicted.evict.notify_one();
            admitted = Admitted::Evicted {
                handshaking: evicted.serving.is_none(),
            };
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let evict = Arc::new(Notify::new());
        *conns.per_peer.entry(peer).or_insert(0) += 1;
        conns.open.insert(
            id,
            Entry {
                peer,
                serving: None,
                evict: Arc::clone(&evict),
            },
        );
        let slot = ConnSlot {
            table: Arc::clone(self),
            id,
            evict,
        };
        Some((slot, admitted))
    }

    /// Connections in the table (tests and diagnostics).
    pub fn len(&self) -> usize {
        let conns = lock(&self.conns);
        conns.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's place in the [`ConnTable`], given back on drop (unless
/// it was evicted, when its place already went to another).
#[derive(Debug)]
pub struct ConnSlot {
    table: Arc<ConnTable>,
    id: u64,
    evict: Arc<Notify>,
}

impl ConnSlot {
    /// Completes when the connection has been evicted and must close.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// The handshake is done: from now on the connection is evicted only when
    /// `activity` shows no open request.
    pub fn serving(&self, activity: &Activity) {
        let mut conns = lock(&self.table.conns);
        if let Some(e) = conns.open.get_mut(&self.id) {
            e.serving = Some(activity.clone());
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut conns = lock(&self.table.conns);
        conns.remove(self.id);
    }
}

/// The peer a remote address counts as: an IPv4 address (IPv4-mapped IPv6
/// ones included, so a dual-stack listener cannot double a peer's share), or
/// an IPv6 address's /64, which one host usually holds whole: counted per
/// address, one IPv6 host could open as many connections as it has addresses.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Open connections per peer ([`peer_key`]), at most `max` each.
#[derive(Debug)]
pub struct PeerSlots {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `ip`, or `None` when it already has `max` connections.
    /// IPv4-mapped IPv6 addresses count as their IPv4 address, so a dual-stack
    /// listener cannot be used to double a peer's share.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let ip = peer_key(ip);
        // The map is only ever left consistent (no panics while held), so a
        // poisoned lock still holds valid counts.
        let mut open = lock(&self.open);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            slots: Arc::clone(self),
            ip,
        })
    }

    /// Open connections of `ip` (tests and diagnostics).
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = lock(&self.open);
        open.get(&peer_key(ip)).copied().unwrap_or(0)
    }
}

/// One connection's share of its peer's slots, given back on drop.
#[derive(Debug)]
pub struct PeerSlot {
    slots: Arc<PeerSlots>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.slots.open);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Entries of peers with no connection go, so the map is
                // bounded by open connections, not by every address ever seen.
                open.remove(&self.ip);
            }
        }
    }
}

/// At most one WARN line per `every` about refused connections, with the
/// number refused since the last line: an attacker opening thousands of
/// sockets must not also flood the logs.
#[derive(Debug)]
pub struct RefusalLog {
    every: Duration,
    state: Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(RefusalState::default()),
        }
    }

    /// Counts one refusal at `now`; returns how many refusals the line to
    /// log now covers (this one included), or `None` when it stays quiet.
    pub fn record(&self, now: Instant) -> Option<u64> {
        let mut s = lock(&self.state);
        s.suppressed += 1;
        let due = s.last.is_none_or(|last| now >= last + self.every);
        if !due {
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// Open requests (HTTP/2 streams with a live response) of one connection.
#[derive(Debug, Clone)]
pub struct Activity {
    open: Arc<watch::Sender<usize>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            open: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Activity {
    /// Marks a request open until the guard is dropped.
    pub fn begin(&self) -> ActiveRequest {
        self.open.send_modify(|n| *n += 1);
        ActiveRequest {
            open: Arc::clone(&self.open),
        }
    }

    /// Whether no request is open right now.
    pub fn is_idle(&self) -> bool {
        *self.open.borrow() == 0
    }

    /// Completes once the connection has had no open request for `idle`
    /// without a break.
    pub async fn idle_for(&self, idle: Duration) {
        let mut rx = self.open.subscribe();
        loop {
            if *rx.borrow_and_update() == 0 {
                tokio::select! {
                    () = tokio::time::sleep(idle) => return,
                    _ = rx.changed() => {}
                }
            } else if rx.changed().await.is_err() {
                // Cannot happen while `self` holds the sender.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// One open request; closes it on drop.
#[derive(Debug)]
pub struct ActiveRequest {
    open: Arc<watch::Sender<usize>>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_slots_cap_each_address_and_come_back() {
        let slots = PeerSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(mapped).expect("same peer, second slot");
        assert!(slots.try_acquire(a).is_none(), "third refused");
        assert!(
            slots.try_acquire(mapped).is_none(),
            "the mapped form is the same peer"
        );
        assert!(slots.try_acquire(b).is_some(), "other peers unaffected");
        drop(first);
        assert_eq!(slots.open(a), 1);
        assert!(slots.try_acquire(a).is_some(), "a slot came back");
    }

    /// `slot` has been told to close.
    fn assert_evicted(slot: &ConnSlot) {
        use futures_util::FutureExt;
        assert!(slot.evicted().now_or_never().is_some(), "not evicted");
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn the_peer_holding_most_connections_gives_way_first() {
        let table = ConnTable::new(4);
        let (caller, _) = table.admit(B).unwrap(); // the oldest, in its handshake
        let mut attacker = Vec::new();
        for _ in 0..3 {
            attacker.push(table.admit(A).unwrap().0);
        }
        for _ in 0..5 {
            let (slot, admitted) = table.admit(A).unwrap();
            assert_eq!(admitted, Admitted::Evicted { handshaking: true });
            assert_evicted(&attacker.remove(0));
            attacker.push(slot);
        }
        // B gets a second one, still at A's expense...
        let (_b1, admitted) = table.admit(B).unwrap();
        assert_eq!(admitted, Admitted::Evicted { handshaking: true });
        assert_evicted(&attacker.remove(0));
        // ...then both hold two: the oldest of all goes, B's first.
        let (_b2, admitted) = table.admit(B).unwrap();
        assert_eq!(admitted, Admitted::Evicted { handshaking: true });
        assert_evicted(&caller);
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn a_full_table_evicts_handshakes_then_idle_connections_never_busy_ones() {
        let table = ConnTable::new(3);
        let busy = Activity::default();
        let _request = busy.begin();
        let (first, _) = table.admit(A).unwrap();
        first.serving(&busy);
        let (idle, _) = table.admit(A).unwrap();
        idle.serving(&Activity::default());
        let (handshaking, admitted) = table.admit(A).unwrap();
        assert_eq!(admitted, Admitted::Room);

        // Full: the one in its handshake goes first, although it is the newest.
        let (second, admitted) = table.admit(A).unwrap();
        assert_eq!(admitted, Admitted::Evicted { handshaking: true });
        assert_evicted(&handshaking);
        drop(handshaking); // its place went to `second`: nothing to give back
        assert_eq!(table.len(), 3);

        // No handshake left once `second` serves: the idle one goes.
        second.serving(&busy);
        let (third, admitted) = table.admit(A).unwrap();
        assert_eq!(admitted, Admitted::Evicted { handshaking: false });
        assert_evicted(&idle);

        // Every connection busy: refused, nothing evicted.
        third.serving(&busy);
        assert!(
            table.admit(A).is_none(),
            "a busy connection is never evicted"
        );
        assert_eq!(table.len(), 3);
        drop(third);
        assert_eq!(table.len(), 2, "a closing connection gives its place back");
        assert_eq!(table.admit(A).map(|(_, a)| a), Some(Admitted::Room));
    }

    #[test]
    fn an_ipv6_peer_is_its_64() {
        let slots = PeerSlots::new(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let next: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _first = slots.try_acquire(a).unwrap();
        let _second = slots.try_acquire(same).expect("same /64, second slot");
        assert!(
            slots
                .try_acquire("2001:db8:1:2::99".parse().unwrap())
                .is_none(),
            "a third address of the /64 is the same peer"
        );
        assert!(slots.try_acquire(next).is_some(), "the next /64 is another");
        assert_eq!(slots.open(same), 2);
        // The connection table counts peers the same way.
        let table = ConnTable::new(2);
        let t1 = table.admit(a).unwrap();
        let _t2 = table.admit(next).unwrap();
        let (_t3, admitted) = table.admit(same).unwrap();
        assert_eq!(admitted, Admitted::Evicted { handshaking: true });
        assert_evicted(&t1.0);
    }

    #[test]
    fn peer_slots_forget_peers_with_no_connection() {
        let slots = PeerSlots::new(1);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(slots.try_acquire(a));
        assert!(slots.open.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_log_speaks_once_per_period_with_a_count() {
        let log = RefusalLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.record(t0), Some(1), "the first refusal is logged");
        for i in 1..=99 {
            assert_eq!(log.record(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(
            log.record(t0 + Duration::from_secs(10)),
            Some(100),
            "the next line counts the 99 suppressed and itself"
        );
        assert_eq!(log.record(t0 + Duration::from_secs(11)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_no_open_request_for_the_whole_period() {
        let activity = Activity::default();
        let idle = Duration::from_secs(5);
        let start = Instant::now();
        let req = activity.begin();
        let waiter = tokio::spawn({
            let a = activity.clone();
            async move {
                a.idle_for(idle).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!waiter.is_finished(), "a request is open: never idle");
        drop(req);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let again = activity.begin(); // activity restarts the period
        drop(again);
        let done = waiter.await.unwrap();
        assert_eq!(done - start, Duration::from_secs(23 + 5));
    }
}
