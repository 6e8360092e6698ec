//! Network bring-up before the agent talks to the control plane: loopback up, the
//! first Ethernet-like interface up, then its IPv4 configuration from the identity
//! document (static) or DHCPv4 (the default), a default route and `/etc/resolv.conf`.

use std::net::Ipv4Addr;
use std::time::Duration;

use powernode_proto::NetworkConfig;

use crate::dhcp::{self, DhcpError, MessageType};
use crate::netlink;
use crate::sys::{Errno, Sys};

const SYS_CLASS_NET: &str = "/sys/class/net";
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// DISCOVER attempts and how long each waits for an answer.
const DHCP_ATTEMPTS: u32 = 4;
const DHCP_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error("no network interface besides lo in {SYS_CLASS_NET}")]
    NoInterface,
    #[error("{what} failed")]
    Sys {
        what: String,
        #[source]
        errno: Errno,
    },
    #[error("interface {ifname} has no usable MAC address ({text:?})")]
    BadMac { ifname: String, text: String },
    #[error("DHCP on {ifname}: no answer to {attempts} DISCOVERs")]
    DhcpTimeout { ifname: String, attempts: u32 },
    #[error("DHCP on {ifname}")]
    Dhcp {
        ifname: String,
        #[source]
        error: DhcpError,
    },
    #[error("static network config field `{field}` is invalid: {value:?}")]
    BadStatic { field: &'static str, value: String },
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(Errno) -> NetError {
    let what = what.into();
    move |errno| NetError::Sys { what, errno }
}

/// What was configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Configured {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// `dhcp` or `static`.
    pub source: &'static str,
    /// A DHCP lease that runs out, for the renewer ([`crate::dhcp_renew`]).
    #[serde(skip)]
    pub lease: Option<dhcp::BoundLease>,
}

/// The interface to configure: the first (by name) that is not loopback or a tunnel.
pub fn pick_interface(sys: &mut dyn Sys) -> Result<String, NetError> {
    let mut names = sys
        .list_dir(SYS_CLASS_NET)
        .map_err(sys_err(format!("listing {SYS_CLASS_NET}")))?;
    names.sort();
    names
        .into_iter()
        .find(|n| {
            n != "lo"
                && !["sit", "tunl", "ip6tnl", "gre", "dummy"]
                    .iter()
                    .any(|p| n.starts_with(p))
        })
        .ok_or(NetError::NoInterface)
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

fn link_up(sys: &mut dyn Sys, seq: &mut u32, ifname: &str) -> Result<u32, NetError> {
    let index = sys
        .if_index(ifname)
        .map_err(sys_err(format!("looking up interface {ifname}")))?;
    *seq += 1;
    sys.netlink(&netlink::link_up(*seq, index), *seq)
        .map_err(sys_err(format!("setting {ifname} up")))?;
    Ok(index)
}

/// DISCOVER -> OFFER -> REQUEST -> ACK, each DISCOVER retried on silence.
pub fn dhcp_lease(sys: &mut dyn Sys, ifname: &str, mac: [u8; 6]) -> Result<dhcp::Reply, NetError> {
    let wrap = |error| NetError::Dhcp {
        ifname: ifname.to_string(),
        error,
    };
    for attempt in 0..DHCP_ATTEMPTS {
        // Unique enough per boot and per attempt; no RNG needed this early.
        let xid = u32::from_be_bytes([mac[2] ^ mac[5], mac[3], mac[4], mac[5]])
            ^ (sys.boot_ms() as u32).rotate_left(8)
            ^ attempt;
        let mut accept = |b: &[u8]| dhcp::parse(b, xid).is_ok_and(|r| r.kind == MessageType::Offer);
        let offer =
            match sys.dhcp_exchange(ifname, &dhcp::discover(xid, mac), DHCP_TIMEOUT, &mut accept) {
                Ok(bytes) => dhcp::parse(&bytes, xid).map_err(wrap)?,
                Err(Errno::TIMEDOUT) => {
                    log::warn!("DHCP: no offer on {ifname} (attempt {})", attempt + 1);
                    continue;
                }
                Err(e) => return Err(sys_err(format!("DHCP DISCOVER on {ifname}"))(e)),
            };
        let server = offer.server_id.ok_or(NetError::Dhcp {
            ifname: ifname.to_string(),
            error: DhcpError::Missing("offer", "server identifier (54)"),
        })?;
        // A NAK is an answer too: let the parser turn it into an error.
        let mut accept = |b: &[u8]| {
            !matches!(
                dhcp::parse(b, xid),
                Err(DhcpError::NotOurs { .. } | DhcpError::Short(_))
            )
        };
        let request = dhcp::request(xid, mac, offer.your_ip, server);
        match sys.dhcp_exchange(ifname, &request, DHCP_TIMEOUT, &mut accept) {
            Ok(bytes) => {
                let ack = dhcp::parse(&bytes, xid).map_err(wrap)?;
                if ack.kind == MessageType::Ack {
                    return Ok(ack);
                }
            }
            Err(Errno::TIMEDOUT) => {
                log::warn!("DHCP: no ack on {ifname} (attempt {})", attempt + 1);
            }
            Err(e) => return Err(sys_err(format!("DHCP REQUEST on {ifname}"))(e)),
        }
    }
    Err(NetError::DhcpTimeout {
        ifname: ifname.to_string(),
        attempts: DHCP_ATTEMPTS,
    })
}

fn parse_static(
    address: &str,
    gateway: &str,
    dns: &[String],
) -> Result<(Ipv4Addr, u8, Ipv4Addr, Vec<Ipv4Addr>), NetError> {
    let bad = |field, value: &str| NetError::BadStatic {
        field,
        value: value.to_string(),
    };
    let (addr, prefix) = address
        .split_once('/')
        .ok_or_else(|| bad("address", address))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad("address", address))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| bad("address", address))?;
    let gw: Ipv4Addr = gateway.parse().map_err(|_| bad("gateway", gateway))?;
    let dns = dns
        .iter()
        .map(|d| d.parse().map_err(|_| bad("dns", d)))
        .collect::<Result<_, _>>()?;
    Ok((addr, prefix, gw, dns))
}

/// Brings the network up per `config`.
pub fn bring_up(sys: &mut dyn Sys, config: &NetworkConfig) -> Result<Configured, NetError> {
    let mut seq = 0u32;
    link_up(sys, &mut seq, "lo")?;
    let ifname = pick_interface(sys)?;
    let index = link_up(sys, &mut seq, &ifname)?;
    let mut bound = None;
    let (address, prefix, gateway, dns, source) = match config {
        NetworkConfig::Static {
            address,
            gateway,
            dns,
        } => {
            let (a, p, g, d) = parse_static(address, gateway, dns)?;
            (a, p, Some(g), d, "static")
        }
        NetworkConfig::Dhcp => {
            let mac_path = format!("{SYS_CLASS_NET}/{ifname}/address");
            let text = sys
                .read_file(&mac_path, 64)
                .map_err(sys_err(format!("reading {mac_path}")))?;
            let text = String::from_utf8_lossy(&text).into_owned();
            let mac = parse_mac(&text).ok_or_else(|| NetError::BadMac {
                ifname: ifname.clone(),
                text: text.trim().to_string(),
            })?;
            let lease = dhcp_lease(sys, &ifname, mac)?;
            let prefix = lease.prefix().map_err(|error| NetError::Dhcp {
                ifname: ifname.clone(),
                error,
            })?;
            bound =
                dhcp::Renewal::from_ack(&lease, sys.boot_ms()).map(|renewal| dhcp::BoundLease {
                    ifname: ifname.clone(),
                    mac,
                    renewal,
                });
            (
                lease.your_ip,
                prefix,
                lease.routers.first().copied(),
                lease.dns.clone(),
                "dhcp",
            )
        }
    };
    seq += 1;
    sys.netlink(
        &netlink::addr_add(seq, index, address.octets(), prefix),
        seq,
    )
    .map_err(sys_err(format!("adding {address}/{prefix} to {ifname}")))?;
    if let Some(gw) = gateway {
        seq += 1;
        sys.netlink(&netlink::default_route(seq, index, gw.octets()), seq)
            .map_err(sys_err(format!("adding the default route via {gw}")))?;
    }
    if !dns.is_empty() {
        sys.mkdir("/etc", 0o755).map_err(sys_err("creating /etc"))?;
        let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        sys.create_file(RESOLV_CONF, text.as_bytes(), 0o644)
            .map_err(sys_err(format!("writing {RESOLV_CONF}")))?;
    }
    Ok(Configured {
        interface: ifname,
        address,
        prefix,
        gateway,
        dns,
        source,
        lease: bound,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sys::fake::{Call, FakeSys};

    pub(crate) fn with_nic(mut sys: FakeSys) -> FakeSys {
        sys.dirs.insert(
            SYS_CLASS_NET.into(),
            vec!["lo".into(), "sit0".into(), "eth0".into()],
        );
        sys.ifindex.insert("lo".into(), 1);
        sys.ifindex.insert("eth0".into(), 2);
        sys.with_file("/sys/class/net/eth0/address", "52:54:00:12:34:56\n")
    }

    fn netlink_types(sys: &FakeSys) -> Vec<u16> {
        sys.calls
            .iter()
            .filter_map(|c| match c {
                Call::Netlink(m) => Some(u16::from_ne_bytes([m[4], m[5]])),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dhcp_configures_address_route_and_dns() {
        let mut sys = with_nic(FakeSys::default());
        sys.dhcp_answers.extend([Some(2), Some(5)]);
        let got = bring_up(&mut sys, &NetworkConfig::Dhcp).unwrap();
        assert_eq!(
            got,
            Configured {
                interface: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
                source: "dhcp",
                lease: got.lease.clone(),
            }
        );
        // slirp's 24 h lease, from the server that granted it, for the renewer.
        let lease = got.lease.as_ref().unwrap();
        assert_eq!(lease.renewal.server, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(lease.renewal.t1_ms, 43_200_000);
        // lo up, eth0 up, address, route.
        assert_eq!(netlink_types(&sys), [16, 16, 20, 24]);
        let kinds: Vec<u8> = sys
            .calls
            .iter()
            .filter_map(|c| match c {
                Call::Dhcp { kind, .. } => Some(*kind),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, [1, 3], "DISCOVER then REQUEST");
        assert_eq!(sys.files["/etc/resolv.conf"], b"nameserver 10.0.2.3\n");
    }

    #[test]
    fn dhcp_retries_on_silence_then_gives_up() {
        let mut sys = with_nic(FakeSys::default());
        sys.dhcp_answers.extend([None, Some(2), Some(5)]);
        assert!(bring_up(&mut sys, &NetworkConfig::Dhcp).is_ok());
        let mut sys = with_nic(FakeSys::default());
        assert_eq!(
            bring_up(&mut sys, &NetworkConfig::Dhcp).unwrap_err(),
            NetError::DhcpTimeout {
                ifname: "eth0".into(),
                attempts: DHCP_ATTEMPTS
            }
        );
        let mut sys = with_nic(FakeSys::default());
        sys.dhcp_answers.extend([Some(2), Some(6)]);
        assert!(matches!(
            bring_up(&mut sys, &NetworkConfig::Dhcp).unwrap_err(),
            NetError::Dhcp {
                error: DhcpError::Nak,
                ..
            }
        ));
    }

    #[test]
    fn static_config_needs_no_dhcp_and_bad_fields_are_named() {
        let mut sys = with_nic(FakeSys::default());
        let config = NetworkConfig::Static {
            address: "192.168.7.9/16".into(),
            gateway: "192.168.0.1".into(),
            dns: vec!["1.1.1.1".into()],
        };
        let got = bring_up(&mut sys, &config).unwrap();
        assert_eq!(
            (got.address, got.prefix, got.source),
            (Ipv4Addr::new(192, 168, 7, 9), 16, "static")
        );
        assert!(!sys.calls.iter().any(|c| matches!(c, Call::Dhcp { .. })));
        let bad = NetworkConfig::Static {
            address: "192.168.7.9".into(),
            gateway: "192.168.0.1".into(),
            dns: vec![],
        };
        let mut sys = with_nic(FakeSys::default());
        assert!(matches!(
            bring_up(&mut sys, &bad).unwrap_err(),
            NetError::BadStatic {
                field: "address",
                ..
            }
        ));
    }

    #[test]
    fn no_nic_and_bad_mac_are_errors() {
        let mut sys = FakeSys::default();
        sys.dirs.insert(SYS_CLASS_NET.into(), vec!["lo".into()]);
        sys.ifindex.insert("lo".into(), 1);
        assert_eq!(
            bring_up(&mut sys, &NetworkConfig::Dhcp).unwrap_err(),
            NetError::NoInterface
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
        assert_eq!(
            parse_mac("52:54:00:12:34:56\n"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
    }
}
