//! rtnetlink messages for the three things the init asks of the kernel's network
//! stack: set a link up, add an IPv4 address, add a default route. Pure byte
//! builders and an ack parser; [`crate::sys::Sys::netlink`] sends them.

/// `RTM_NEWLINK`, `RTM_NEWADDR`, `RTM_NEWROUTE`.
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Wraps a payload in an `nlmsghdr` asking for an ack.
fn message(kind: u16, extra_flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | extra_flags).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

/// `ip link set dev IFINDEX up`
pub fn link_up(seq: u32, ifindex: u32) -> Vec<u8> {
    let mut p = vec![AF_UNSPEC, 0];
    p.extend_from_slice(&0u16.to_ne_bytes()); // type
    p.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    p.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
    p.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
    message(RTM_NEWLINK, 0, seq, &p)
}

/// `ip addr replace ADDR/PREFIX brd + dev IFINDEX`
pub fn addr_add(seq: u32, ifindex: u32, addr: [u8; 4], prefix: u8) -> Vec<u8> {
    let mut p = vec![AF_INET, prefix, 0, RT_SCOPE_UNIVERSE];
    p.extend_from_slice(&ifindex.to_ne_bytes());
    attr(&mut p, IFA_LOCAL, &addr);
    attr(&mut p, IFA_ADDRESS, &addr);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    let brd = (u32::from_be_bytes(addr) | !mask).to_be_bytes();
    attr(&mut p, IFA_BROADCAST, &brd);
    message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// `ip route replace default via GATEWAY dev IFINDEX`
pub fn default_route(seq: u32, ifindex: u32, gateway: [u8; 4]) -> Vec<u8> {
    let mut p = vec![
        AF_INET,
        0, // dst_len: default route
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
    ];
    p.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    attr(&mut p, RTA_GATEWAY, &gateway);
    attr(&mut p, RTA_OIF, &ifindex.to_ne_bytes());
    message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// Reads the kernel's answer to a request: `Ok(())` for an ack, `Err(errno)` for an
/// error, `None` when `reply` holds no `NLMSG_ERROR` for `seq`.
pub fn parse_ack(reply: &[u8], seq: u32) -> Option<Result<(), i32>> {
    let mut pos = 0usize;
    while let Some(head) = reply.get(pos..pos + 16) {
        let len = u32::from_ne_bytes(head.get(0..4)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(head.get(4..6)?.try_into().ok()?);
        let mseq = u32::from_ne_bytes(head.get(8..12)?.try_into().ok()?);
        if len < 16 {
            return None;
        }
        if kind == NLMSG_ERROR && mseq == seq {
            let code = i32::from_ne_bytes(reply.get(pos + 16..pos + 20)?.try_into().ok()?);
            return Some(if code == 0 { Ok(()) } else { Err(-code) });
        }
        pos += len.next_multiple_of(4);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_up_layout() {
        let m = link_up(7, 2);
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes(m[6..8].try_into().unwrap()), 0x5);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 2);
        assert_eq!(u32::from_ne_bytes(m[24..28].try_into().unwrap()), IFF_UP);
    }

    #[test]
    fn addr_has_local_address_and_broadcast() {
        let m = addr_add(1, 2, [10, 0, 2, 15], 24);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(&m[16..20], &[AF_INET, 24, 0, 0]);
        // Three 8-byte attributes after the 8-byte ifaddrmsg.
        assert_eq!(m.len(), 16 + 8 + 3 * 8);
        assert_eq!(&m[28..32], &[10, 0, 2, 15]);
        assert_eq!(&m[44..48], &[10, 0, 2, 255]);
    }

    #[test]
    fn route_names_gateway_and_interface() {
        let m = default_route(3, 2, [10, 0, 2, 2]);
        assert_eq!(m[16], AF_INET);
        assert_eq!(m[17], 0, "default route");
        assert_eq!(&m[32..36], &[10, 0, 2, 2]);
        assert_eq!(u32::from_ne_bytes(m[40..44].try_into().unwrap()), 2);
    }

    #[test]
    fn acks_and_errors_parse() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_ack(&ack, 9), Some(Ok(())));
        assert_eq!(parse_ack(&ack, 10), None);
        ack[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(parse_ack(&ack, 9), Some(Err(17)));
        assert_eq!(parse_ack(&ack[..10], 9), None);
    }
}
