//! DHCPv4 (RFC 2131) packets: DISCOVER and REQUEST out (also the REQUEST that renews
//! or rebinds a bound lease), OFFER / ACK / NAK in. Pure builders and a parser that
//! refuses anything malformed or not ours (wrong xid, wrong op, missing cookie), so
//! the exchange in [`crate::net`] stays small; and [`Renewal`], the pure clock of a
//! bound lease (RENEW at T1, REBIND at T2, gone at the lease's end, RFC 2131 4.4.5).

use std::net::Ipv4Addr;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
/// Fixed BOOTP header before the options (236 bytes) plus the cookie.
const HEADER: usize = 240;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Ack = 5,
    Nak = 6,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("reply is {0} bytes, shorter than a DHCP header")]
    Short(usize),
    #[error("not a reply to us (op {op}, xid {xid:#010x})")]
    NotOurs { op: u8, xid: u32 },
    #[error("reply lacks the DHCP magic cookie")]
    NoCookie,
    #[error("option {0} runs past the end of the reply")]
    Truncated(u8),
    #[error("reply has no DHCP message type")]
    NoType,
    #[error("reply has unknown DHCP message type {0}")]
    UnknownType(u8),
    #[error("the server answered NAK")]
    Nak,
    #[error("the {0} lacks option {1}")]
    Missing(&'static str, &'static str),
    #[error("subnet mask {0} is not a prefix")]
    BadMask(Ipv4Addr),
}

/// What a server offered or acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub your_ip: Ipv4Addr,
    pub server_id: Option<Ipv4Addr>,
    pub subnet_mask: Option<Ipv4Addr>,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease_seconds: Option<u32>,
    /// T1, the renewal time (option 58).
    pub renewal_seconds: Option<u32>,
    /// T2, the rebinding time (option 59).
    pub rebinding_seconds: Option<u32>,
}

impl Reply {
    /// Prefix length of the subnet mask (/24 when the server sends none).
    pub fn prefix(&self) -> Result<u8, DhcpError> {
        let Some(mask) = self.subnet_mask else {
            return Ok(24);
        };
        let bits = u32::from(mask);
        let prefix = bits.leading_ones();
        if bits.checked_shl(prefix).unwrap_or(0) != 0 {
            return Err(DhcpError::BadMask(mask));
        }
        Ok(prefix as u8)
    }
}

/// A BOOTREQUEST. Without `ciaddr` (no address yet) replies are asked to be
/// broadcast; with it (renewing or rebinding a bound lease) the address is ours and
/// the reply comes to it.
fn packet(
    kind: MessageType,
    xid: u32,
    mac: [u8; 6],
    ciaddr: Option<Ipv4Addr>,
    extra: &[(u8, Vec<u8>)],
) -> Vec<u8> {
    let mut p = vec![0u8; HEADER];
    if let Some(head) = p.get_mut(..4) {
        head.copy_from_slice(&[BOOTREQUEST, 1, 6, 0]); // op, htype ethernet, hlen, hops
    }
    if let Some(x) = p.get_mut(4..8) {
        x.copy_from_slice(&xid.to_be_bytes());
    }
    match ciaddr {
        Some(ip) => {
            if let Some(c) = p.get_mut(12..16) {
                c.copy_from_slice(&ip.octets());
            }
        }
        // flags: ask for broadcast replies, since we have no address yet.
        None => {
            if let Some(f) = p.get_mut(10..12) {
                f.copy_from_slice(&0x8000u16.to_be_bytes());
            }
        }
    }
    if let Some(ch) = p.get_mut(28..34) {
        ch.copy_from_slice(&mac);
    }
    if let Some(c) = p.get_mut(236..240) {
        c.copy_from_slice(&COOKIE);
    }
    p.extend_from_slice(&[53, 1, kind as u8]);
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    let mut options = vec![(61u8, client_id)];
    options.extend(extra.iter().cloned());
    // subnet mask, router, DNS, domain name, lease time, server id, T1, T2
    options.push((55, vec![1, 3, 6, 15, 51, 54, 58, 59]));
    for (code, data) in options {
        p.push(code);
        p.push(data.len() as u8);
        p.extend_from_slice(&data);
    }
    p.push(255);
    // BOOTP relays expect at least 300 bytes.
    if p.len() < 300 {
        p.resize(300, 0);
    }
    p
}

pub fn discover(xid: u32, mac: [u8; 6]) -> Vec<u8> {
    packet(MessageType::Discover, xid, mac, None, &[])
}

/// The REQUEST that extends a bound lease of `address` (RENEWING, unicast to the
/// server that granted it, and REBINDING, broadcast, send the same packet): `ciaddr`
/// is the address, and neither a requested address (50) nor a server id (54) is
/// named (RFC 2131 4.3.2).
pub fn renew(xid: u32, mac: [u8; 6], address: Ipv4Addr) -> Vec<u8> {
    packet(MessageType::Request, xid, mac, Some(address), &[])
}

pub fn request(xid: u32, mac: [u8; 6], offered: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
    packet(
        MessageType::Request,
        xid,
        mac,
        None,
        &[
            (50, offered.octets().to_vec()),
            (54, server.octets().to_vec()),
        ],
    )
}

fn addrs(data: &[u8]) -> Vec<Ipv4Addr> {
    data.chunks_exact(4)
        .filter_map(|c| <[u8; 4]>::try_from(c).ok().map(Ipv4Addr::from))
        .collect()
}

fn seconds(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_be_bytes)
}

/// Parses a server's reply to transaction `xid`.
pub fn parse(bytes: &[u8], xid: u32) -> Result<Reply, DhcpError> {
    let head = bytes.get(..HEADER).ok_or(DhcpError::Short(bytes.len()))?;
    let op = head.first().copied().unwrap_or(0);
    let rxid = head
        .get(4..8)
        .and_then(|x| <[u8; 4]>::try_from(x).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0);
    if op != BOOTREPLY || rxid != xid {
        return Err(DhcpError::NotOurs { op, xid: rxid });
    }
    if head.get(236..240) != Some(COOKIE.as_slice()) {
        return Err(DhcpError::NoCookie);
    }
    let your_ip = head
        .get(16..20)
        .and_then(|x| <[u8; 4]>::try_from(x).ok())
        .map(Ipv4Addr::from)
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut reply = Reply {
        kind: MessageType::Discover,
        your_ip,
        server_id: None,
        subnet_mask: None,
        routers: Vec::new(),
        dns: Vec::new(),
        lease_seconds: None,
        renewal_seconds: None,
        rebinding_seconds: None,
    };
    let mut kind = None;
    let mut rest = bytes.get(HEADER..).unwrap_or_default();
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => {
                rest = tail;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, tail) = tail.split_first().ok_or(DhcpError::Truncated(code))?;
        let data = tail.get(..len as usize).ok_or(DhcpError::Truncated(code))?;
        rest = tail.get(len as usize..).unwrap_or_default();
        match code {
            53 => kind = data.first().copied(),
            54 => reply.server_id = addrs(data).first().copied(),
            1 => reply.subnet_mask = addrs(data).first().copied(),
            3 => reply.routers = addrs(data),
            6 => reply.dns = addrs(data),
            51 => reply.lease_seconds = seconds(data),
            58 => reply.renewal_seconds = seconds(data),
            59 => reply.rebinding_seconds = seconds(data),
            _ => {}
        }
    }
    reply.kind = match kind.ok_or(DhcpError::NoType)? {
        2 => MessageType::Offer,
        5 => MessageType::Ack,
        6 => return Err(DhcpError::Nak),
        other => return Err(DhcpError::UnknownType(other)),
    };
    Ok(reply)
}

/// "Infinite" in option 51: the lease never needs renewing.
const INFINITE: u32 = u32::MAX;
/// The least wait between two retransmissions while renewing or rebinding.
const MIN_RETRANSMIT_MS: u64 = 60_000;

/// What to do next about a bound lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing until this many ms from now.
    Wait(u64),
    /// Send the renewal REQUEST to the server that granted the lease (RENEWING).
    Renew,
    /// Broadcast it to any server (REBINDING).
    Rebind,
    /// The lease ran out unrenewed: the address must not be used any more.
    Expired,
}

/// A bound lease and what renewing it needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundLease {
    pub ifname: String,
    pub mac: [u8; 6],
    pub renewal: Renewal,
}

/// The clock of a bound lease (RFC 2131 4.4.5), in ms of a monotonic clock that
/// survives an exec (CLOCK_BOOTTIME): T1 and T2 as the server said, else half and
/// seven eighths of the lease; a retransmission after half the time left to T2 (while
/// renewing) or to the lease's end (while rebinding), never sooner than 60 s.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Renewal {
    pub address: Ipv4Addr,
    pub server: Ipv4Addr,
    /// When the ACK came.
    pub bound_ms: u64,
    pub lease_ms: u64,
    pub t1_ms: u64,
    pub t2_ms: u64,
    /// The last REQUEST sent since the ACK, if any.
    pub sent_ms: Option<u64>,
}

impl Renewal {
    /// The lease an ACK granted at `now_ms`; `None` when it never runs out (infinite
    /// or no lease time) or names no server to renew with.
    pub fn from_ack(ack: &Reply, now_ms: u64) -> Option<Self> {
        let lease = ack.lease_seconds.filter(|l| *l != INFINITE && *l > 0)?;
        let server = ack.server_id?;
        let lease_ms = u64::from(lease) * 1000;
        let t2_ms = ack
            .rebinding_seconds
            .map(|t| u64::from(t) * 1000)
            .filter(|t| *t < lease_ms)
            .unwrap_or(lease_ms * 7 / 8);
        let t1_ms = ack
            .renewal_seconds
            .map(|t| u64::from(t) * 1000)
            .filter(|t| *t <= t2_ms)
            .unwrap_or((lease_ms / 2).min(t2_ms));
        Some(Self {
            address: ack.your_ip,
            server,
            bound_ms: now_ms,
            lease_ms,
            t1_ms,
            t2_ms,
            sent_ms: None,
        })
    }

    /// What to do at `now_ms`.
    pub fn next(&self, now_ms: u64) -> Step {
        let at = now_ms.saturating_sub(self.bound_ms);
        let sent = self.sent_ms.map(|s| s.saturating_sub(self.bound_ms));
        if at >= self.lease_ms {
            return Step::Expired;
        }
        let (start, end, step) = if at >= self.t2_ms {
            (self.t2_ms, self.lease_ms, Step::Rebind)
        } else if at >= self.t1_ms {
            (self.t1_ms, self.t2_ms, Step::Renew)
        } else {
            return Step::Wait(self.t1_ms - at);
        };
        // The first REQUEST of this state goes at once; the next after half the time
        // that was left when the last one went.
        let due = match sent {
            Some(s) if s >= start => s + ((end - s) / 2).max(MIN_RETRANSMIT_MS),
            _ => start,
        };
        if at >= due {
            step
        } else {
            Step::Wait(due.min(end) - at)
        }
    }

    /// A REQUEST went at `now_ms`.
    pub fn sent(&mut self, now_ms: u64) {
        self.sent_ms = Some(now_ms);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A server reply as slirp would send it.
    pub(crate) fn reply(kind: u8, xid: u32) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0] = BOOTREPLY;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 0, 2, 15]);
        p[236..240].copy_from_slice(&COOKIE);
        p.extend_from_slice(&[53, 1, kind]);
        p.extend_from_slice(&[54, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[1, 4, 255, 255, 255, 0]);
        p.extend_from_slice(&[3, 4, 10, 0, 2, 2]);
        p.extend_from_slice(&[6, 4, 10, 0, 2, 3]);
        p.extend_from_slice(&[51, 4, 0, 1, 81, 128]);
        p.push(0);
        p.push(255);
        p
    }

    #[test]
    fn discover_and_request_layout() {
        let d = discover(0xdeadbeef, MAC);
        assert_eq!(d.len(), 300);
        assert_eq!(&d[..4], &[1, 1, 6, 0]);
        assert_eq!(&d[4..8], &0xdeadbeefu32.to_be_bytes());
        assert_eq!(&d[10..12], &[0x80, 0]);
        assert_eq!(&d[28..34], &MAC);
        assert_eq!(&d[236..243], &[99, 130, 83, 99, 53, 1, 1]);
        let r = request(
            1,
            MAC,
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
        );
        let opts = &r[240..];
        assert!(opts.windows(6).any(|w| w == [50, 4, 10, 0, 2, 15]));
        assert!(opts.windows(6).any(|w| w == [54, 4, 10, 0, 2, 2]));
    }

    #[test]
    fn offer_and_ack_parse() {
        let offer = parse(&reply(2, 7), 7).unwrap();
        assert_eq!(offer.kind, MessageType::Offer);
        assert_eq!(offer.your_ip, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(offer.server_id, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(offer.routers, [Ipv4Addr::new(10, 0, 2, 2)]);
        assert_eq!(offer.dns, [Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(offer.lease_seconds, Some(86400));
        assert_eq!(offer.prefix().unwrap(), 24);
        assert_eq!(parse(&reply(5, 7), 7).unwrap().kind, MessageType::Ack);
    }

    #[test]
    fn foreign_and_broken_replies_are_refused() {
        assert!(matches!(
            parse(&reply(2, 7), 8),
            Err(DhcpError::NotOurs { .. })
        ));
        assert_eq!(parse(&reply(6, 7), 7), Err(DhcpError::Nak));
        assert_eq!(parse(&[0; 10], 7), Err(DhcpError::Short(10)));
        let mut r = reply(2, 7);
        r[236] = 0;
        assert_eq!(parse(&r, 7), Err(DhcpError::NoCookie));
        let mut r = reply(2, 7);
        r.truncate(HEADER + 3 + 3);
        assert_eq!(parse(&r, 7), Err(DhcpError::Truncated(54)));
        assert_eq!(
            parse(&discover(7, MAC), 7),
            Err(DhcpError::NotOurs { op: 1, xid: 7 })
        );
        let mut bad = parse(&reply(2, 7), 7).unwrap();
        bad.subnet_mask = Some(Ipv4Addr::new(255, 0, 255, 0));
        assert!(matches!(bad.prefix(), Err(DhcpError::BadMask(_))));
    }

    #[test]
    fn a_renewal_request_names_our_address_and_no_server() {
        let ip = Ipv4Addr::new(10, 0, 2, 15);
        let r = renew(9, MAC, ip);
        assert_eq!(&r[..4], &[1, 1, 6, 0]);
        assert_eq!(&r[4..8], &9u32.to_be_bytes());
        assert_eq!(
            &r[10..12],
            &[0, 0],
            "no broadcast flag: the address is ours"
        );
        assert_eq!(&r[12..16], &ip.octets(), "ciaddr");
        assert_eq!(&r[16..20], &[0; 4], "yiaddr");
        assert_eq!(&r[236..243], &[99, 130, 83, 99, 53, 1, 3]);
        let opts = &r[243..];
        assert!(
            !opts.windows(2).any(|w| w == [50, 4]),
            "no requested address"
        );
        assert!(!opts.windows(2).any(|w| w == [54, 4]), "no server id");
        // T1 and T2 are asked for, and parsed.
        assert!(opts
            .windows(10)
            .any(|w| w == [55, 8, 1, 3, 6, 15, 51, 54, 58, 59]));
        let mut ack = reply(5, 9);
        let end = ack.len() - 1;
        ack.splice(
            end..end,
            [58, 4, 0, 0, 0, 100, 59, 4, 0, 0, 0, 175].iter().copied(),
        );
        let ack = parse(&ack, 9).unwrap();
        assert_eq!(
            (ack.renewal_seconds, ack.rebinding_seconds),
            (Some(100), Some(175))
        );
    }

    #[test]
    fn a_bound_lease_renews_at_t1_rebinds_at_t2_and_ends() {
        const S: u64 = 1000;
        // slirp: 86400 s, no T1/T2: half and seven eighths. Bound 5 s into the boot.
        let ack = parse(&reply(5, 7), 7).unwrap();
        let mut r = Renewal::from_ack(&ack, 5 * S).unwrap();
        assert_eq!(
            (r.t1_ms, r.t2_ms, r.lease_ms),
            (43_200 * S, 75_600 * S, 86_400 * S)
        );
        assert_eq!(r.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(r.next(5 * S), Step::Wait(43_200 * S));
        let t1 = 5 * S + r.t1_ms;
        assert_eq!(r.next(t1), Step::Renew);
        r.sent(t1);
        // No answer: again after half the time left to T2.
        assert_eq!(r.next(t1 + S), Step::Wait(16_200 * S - S));
        assert_eq!(r.next(t1 + 16_200 * S), Step::Renew);
        r.sent(t1 + 16_200 * S);
        let t2 = 5 * S + r.t2_ms;
        assert_eq!(r.next(t2), Step::Rebind);
        r.sent(t2);
        assert_eq!(r.next(t2), Step::Wait(5_400 * S));
        assert_eq!(r.next(5 * S + r.lease_ms), Step::Expired);
        // An ACK starts a new clock.
        let r2 = Renewal::from_ack(&ack, t2 + 3 * S).unwrap();
        assert_eq!(r2.next(t2 + 3 * S), Step::Wait(43_200 * S));
    }

    #[test]
    fn short_leases_keep_60_s_between_requests_and_the_server_s_t1_t2_count() {
        const S: u64 = 1000;
        let mut ack = parse(&reply(5, 7), 7).unwrap();
        ack.lease_seconds = Some(120);
        let mut r = Renewal::from_ack(&ack, 0).unwrap();
        assert_eq!((r.t1_ms, r.t2_ms), (60 * S, 105 * S));
        r.sent(60 * S);
        // Half of the 45 s left is under a minute: the next REQUEST is the REBIND at T2.
        assert_eq!(r.next(61 * S), Step::Wait(44 * S));
        assert_eq!(r.next(105 * S), Step::Rebind);
        // The server's T1 and T2, when they make sense.
        ack.renewal_seconds = Some(30);
        ack.rebinding_seconds = Some(90);
        let r = Renewal::from_ack(&ack, 0).unwrap();
        assert_eq!((r.t1_ms, r.t2_ms), (30 * S, 90 * S));
        ack.renewal_seconds = Some(100);
        ack.rebinding_seconds = Some(200);
        let r = Renewal::from_ack(&ack, 0).unwrap();
        assert_eq!(
            (r.t1_ms, r.t2_ms),
            (100 * S, 105 * S),
            "T2 past the lease: its default"
        );
        // Nothing to renew: an infinite lease, no lease time, no server id.
        ack.lease_seconds = Some(u32::MAX);
        assert_eq!(Renewal::from_ack(&ack, 0), None);
        ack.lease_seconds = None;
        assert_eq!(Renewal::from_ack(&ack, 0), None);
        ack.lease_seconds = Some(120);
        ack.server_id = None;
        assert_eq!(Renewal::from_ack(&ack, 0), None);
    }
}
