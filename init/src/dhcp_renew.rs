//! Keeping the DHCP lease the boot took ([`crate::net`]) for as long as the node
//! runs. The network phase leaves the lease in [`LEASE_FILE`] (under `/run`, which
//! moves with switch_root); whatever runs the agent afterwards (the init as PID 1 of
//! the initramfs or of the composed root, or the init's `agent-service` under
//! systemd) starts [`spawn`], a thread that follows the lease's clock
//! ([`dhcp::Renewal`]): a REQUEST naming the address at T1 (RENEWING) and again at
//! T2 (REBINDING) until an ACK starts a new clock, each logged (`dhcp renewed` on
//! the console and in kmsg). A NAK or a lease that runs out unrenewed is logged as an
//! error and answered by a fresh DISCOVER; an address that changed is reported, not
//! applied.
//!
//! It never panics and never ends the node: a failure is logged and retried.
//! Known limit: the `Sys` seam sends DHCP packets as broadcasts only, so RENEWING's
//! REQUEST is broadcast too (servers answer it as they answer REBINDING).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::dhcp::{self, BoundLease, DhcpError, MessageType, Renewal, Step};
use crate::sys::{Errno, Sys};

/// Where the network phase leaves the lease for the renewer.
pub const LEASE_FILE: &str = "/run/powernode/dhcp-lease.json";
/// How long a renewal REQUEST waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The renewer re-reads the clock at least this often (a suspended VM, a long T1).
const MAX_SLEEP: Duration = Duration::from_secs(600);
/// After a failed fresh DISCOVER, the next one.
const REDISCOVER_AFTER: Duration = Duration::from_secs(60);

/// Writes the lease for the renewer (its folder made if needed).
pub fn save(sys: &mut dyn Sys, lease: &BoundLease) -> Result<(), Errno> {
    crate::sys::ok_if_exists(sys.mkdir(crate::layout::RUN_STATE_DIR, 0o700))?;
    let bytes = serde_json::to_vec(lease).map_err(|_| Errno::INVAL)?;
    sys.create_file(LEASE_FILE, &bytes, 0o600)
}

/// The lease the boot left, if any (a static or infinite one leaves none).
pub fn load(sys: &mut dyn Sys) -> Option<BoundLease> {
    let bytes = sys.read_file(LEASE_FILE, 64 << 10).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("{LEASE_FILE} is unreadable ({e}); the DHCP lease is not renewed");
            None
        }
    }
}

fn xid(lease: &BoundLease, now_ms: u64) -> u32 {
    let m = lease.mac;
    u32::from_be_bytes([m[2] ^ m[5], m[3], m[4], m[5]]) ^ (now_ms as u32).rotate_left(8)
}

/// One step of the renewer at the clock's `now`: sends what is due and says how long
/// to sleep before the next step.
pub fn tick(sys: &mut dyn Sys, lease: &mut BoundLease) -> Duration {
    let now = sys.boot_ms();
    let step = lease.renewal.next(now);
    let what = match step {
        Step::Wait(ms) => return Duration::from_millis(ms).min(MAX_SLEEP),
        Step::Renew => "RENEW",
        Step::Rebind => "REBIND",
        Step::Expired => return rediscover(sys, lease),
    };
    lease.renewal.sent(now);
    let address = lease.renewal.address;
    let xid = xid(lease, now);
    let mut accept = |b: &[u8]| {
        !matches!(
            dhcp::parse(b, xid),
            Err(DhcpError::NotOurs { .. } | DhcpError::Short(_))
        )
    };
    let packet = dhcp::renew(xid, lease.mac, address);
    let ifname = lease.ifname.clone();
    match sys.dhcp_exchange(&ifname, &packet, ANSWER_TIMEOUT, &mut accept) {
        Ok(bytes) => match dhcp::parse(&bytes, xid) {
            Ok(ack) if ack.kind == MessageType::Ack && ack.your_ip == address => {
                bound(sys, lease, &ack, what);
            }
            Ok(other) => log::warn!(
                "dhcp {what} on {ifname}: answer {:?} for {} ignored (ours is {address})",
                other.kind,
                other.your_ip
            ),
            Err(DhcpError::Nak) => {
                log::error!("dhcp {what} on {ifname}: the server refused {address} (NAK)");
                return rediscover(sys, lease);
            }
            Err(e) => log::warn!("dhcp {what} on {ifname}: bad answer: {e}"),
        },
        Err(Errno::TIMEDOUT) => log::warn!(
            "dhcp {what} on {ifname}: no answer for {address}; the lease ends in {} s",
            lease
                .renewal
                .lease_ms
                .saturating_sub(sys.boot_ms().saturating_sub(lease.renewal.bound_ms))
                / 1000
        ),
        Err(e) => log::warn!("dhcp {what} on {ifname}: {e}"),
    }
    Duration::ZERO
}

/// An ACK for our address: a new clock, kept in [`LEASE_FILE`].
fn bound(sys: &mut dyn Sys, lease: &mut BoundLease, ack: &dhcp::Reply, what: &str) {
    match Renewal::from_ack(ack, sys.boot_ms()) {
        Some(r) => {
            log::info!(
                "dhcp renewed ({what}) on {}: {} for {} s, next renewal in {} s",
                lease.ifname,
                r.address,
                r.lease_ms / 1000,
                r.t1_ms / 1000
            );
            lease.renewal = r;
        }
        None => {
            log::info!(
                "dhcp renewed ({what}) on {}: {} with no end",
                lease.ifname,
                ack.your_ip
            );
            // Nothing left to renew: push the clock beyond any uptime.
            lease.renewal.bound_ms = u64::MAX / 4;
        }
    }
    if let Err(e) = save(sys, lease) {
        log::warn!("keeping the renewed DHCP lease in {LEASE_FILE}: {e}");
    }
}

/// The lease is gone (NAK, or run out): a fresh DISCOVER. The same address is
/// bound again; another one is reported, not applied.
fn rediscover(sys: &mut dyn Sys, lease: &mut BoundLease) -> Duration {
    let ifname = lease.ifname.clone();
    let address = lease.renewal.address;
    log::error!("dhcp on {ifname}: the lease of {address} is gone; asking for a new one");
    match crate::net::dhcp_lease(sys, &ifname, lease.mac) {
        Ok(ack) if ack.your_ip == address => {
            bound(sys, lease, &ack, "DISCOVER");
            Duration::ZERO
        }
        Ok(ack) => {
            log::error!(
                "dhcp on {ifname}: the server now gives {} instead of {address}; \
                 the node keeps {address} (a reboot takes the new one)",
                ack.your_ip
            );
            REDISCOVER_AFTER
        }
        Err(e) => {
            log::error!("dhcp on {ifname}: {e}; trying again in {REDISCOVER_AFTER:?}");
            REDISCOVER_AFTER
        }
    }
}

/// Starts the renewer thread when the boot left a lease; `None` otherwise.
pub fn spawn() -> Option<std::thread::JoinHandle<()>> {
    let mut sys = crate::sys::RealSys::new();
    let mut lease = load(&mut sys)?;
    let address: Ipv4Addr = lease.renewal.address;
    log::info!(
        "dhcp: keeping the lease of {address} on {} (renewal at T1 = {} s after it was bound)",
        lease.ifname,
        lease.renewal.t1_ms / 1000
    );
    std::thread::Builder::new()
        .name("dhcp-renew".into())
        .spawn(move || loop {
            let sleep = tick(&mut sys, &mut lease);
            std::thread::sleep(sleep);
        })
        .map_err(|e| log::warn!("cannot start the DHCP renewer: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, FakeSys};

    const S: u64 = 1000;

    fn lease(sys: &mut FakeSys) -> BoundLease {
        let ack = dhcp::parse(&dhcp::tests::reply(5, 1), 1).unwrap();
        let renewal = Renewal::from_ack(&ack, sys.boot_ms()).unwrap();
        BoundLease {
            ifname: "eth0".into(),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            renewal,
        }
    }

    fn sent(sys: &FakeSys) -> Vec<u8> {
        sys.calls
            .iter()
            .filter_map(|c| match c {
                Call::Dhcp { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_renewer_sleeps_to_t1_renews_and_keeps_the_new_lease() {
        let mut sys = FakeSys {
            now_ms: 4 * S,
            ..FakeSys::default()
        };
        let mut l = lease(&mut sys);
        save(&mut sys, &l).unwrap();
        assert_eq!(load(&mut sys), Some(l.clone()));
        // 24 h lease: nothing to do for 12 h; the renewer wakes every 10 min.
        assert_eq!(tick(&mut sys, &mut l), MAX_SLEEP);
        assert!(sent(&sys).is_empty());
        // At T1 a REQUEST goes out; the ACK starts a new clock, saved.
        sys.now_ms = 4 * S + 43_200 * S;
        sys.dhcp_answers.push_back(Some(5));
        assert_eq!(tick(&mut sys, &mut l), Duration::ZERO);
        assert_eq!(sent(&sys), [3]);
        assert_eq!(l.renewal.bound_ms, sys.now_ms);
        assert_eq!(load(&mut sys), Some(l.clone()));
        assert_eq!(tick(&mut sys, &mut l), MAX_SLEEP);
    }

    #[test]
    fn silence_is_retried_a_nak_and_an_expiry_ask_again() {
        let mut sys = FakeSys::default();
        let mut l = lease(&mut sys);
        // No answer at T1: retried later, then REBIND at T2.
        sys.now_ms = 43_200 * S;
        assert_eq!(tick(&mut sys, &mut l), Duration::ZERO);
        assert!(matches!(l.renewal.next(sys.now_ms), Step::Wait(_)));
        sys.now_ms = 75_600 * S;
        assert_eq!(l.renewal.next(sys.now_ms), Step::Rebind);
        sys.dhcp_answers.push_back(Some(6));
        // A NAK: a fresh DISCOVER that gets the same address binds it again.
        sys.dhcp_answers.extend([Some(2), Some(5)]);
        assert_eq!(tick(&mut sys, &mut l), Duration::ZERO);
        assert_eq!(sent(&sys), [3, 3, 1, 3]);
        assert_eq!(l.renewal.bound_ms, sys.now_ms);
        // Run out with no server at all: DISCOVERs, then a minute's pause.
        sys.now_ms += 86_400 * S;
        assert_eq!(l.renewal.next(sys.now_ms), Step::Expired);
        assert_eq!(tick(&mut sys, &mut l), REDISCOVER_AFTER);
    }
}
