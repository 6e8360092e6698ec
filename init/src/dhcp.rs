//! DHCPv4 (RFC 2131) packets: DISCOVER and REQUEST out, OFFER / ACK / NAK in. Pure
//! builders and a parser that refuses anything malformed or not ours (wrong xid,
//! wrong op, missing cookie), so the exchange in [`crate::net`] stays small.

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

fn packet(kind: MessageType, xid: u32, mac: [u8; 6], extra: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut p = vec![0u8; HEADER];
    if let Some(head) = p.get_mut(..4) {
        head.copy_from_slice(&[BOOTREQUEST, 1, 6, 0]); // op, htype ethernet, hlen, hops
    }
    if let Some(x) = p.get_mut(4..8) {
        x.copy_from_slice(&xid.to_be_bytes());
    }
    // flags: ask for broadcast replies, since we have no address yet.
    if let Some(f) = p.get_mut(10..12) {
        f.copy_from_slice(&0x8000u16.to_be_bytes());
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
    // subnet mask, router, DNS, domain name, lease time, server id
    options.push((55, vec![1, 3, 6, 15, 51, 54]));
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
    packet(MessageType::Discover, xid, mac, &[])
}

pub fn request(xid: u32, mac: [u8; 6], offered: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
    packet(
        MessageType::Request,
        xid,
        mac,
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
            51 => reply.lease_seconds = <[u8; 4]>::try_from(data).ok().map(u32::from_be_bytes),
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
}
