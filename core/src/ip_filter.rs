//! IP filter (docs/policy.md, "IP filter") and the client address it judges.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{index, join, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub deny: Option<Vec<String>>,
}

/// Where the client address comes from (docs/policy.md, "Client IP").
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    /// How many proxies in front of the gateway append to X-Forwarded-For (0: the TCP peer is
    /// the client). Above 0 needs `trusted_proxies`.
    #[serde(default)]
    pub trusted_proxy_hops: u8,
    /// CIDRs of the proxies allowed to connect to the gateway and speak for the client in
    /// X-Forwarded-For. From any other peer, X-Forwarded-For is ignored. Trusting every peer
    /// takes `["0.0.0.0/0", "::/0"]`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub trusted_proxies: Option<Vec<String>>,
}

/// Most proxies a policy may count in X-Forwarded-For.
pub const MAX_TRUSTED_PROXY_HOPS: u8 = 16;

/// The compiled `client_ip` block.
#[derive(Debug, Clone, Default)]
pub struct ClientIpPolicy {
    hops: usize,
    trusted_proxies: Vec<IpNet>,
}

impl ClientIpPolicy {
    /// Hops above 0 need the proxies' addresses: without them any client that reaches the
    /// gateway directly would choose its own address. A list without hops, or an empty list, is
    /// refused too: either would leave the author believing X-Forwarded-For is honoured.
    pub fn compile(cfg: &ClientIpConfig, path: &str) -> Result<Self, ConfigError> {
        let hops_path = join(path, "trusted_proxy_hops");
        let list_path = join(path, "trusted_proxies");
        if cfg.trusted_proxy_hops > MAX_TRUSTED_PROXY_HOPS {
            return Err(ConfigError::new(
                hops_path,
                format!("must be at most {MAX_TRUSTED_PROXY_HOPS}"),
            ));
        }
        let trusted_proxies = match (&cfg.trusted_proxies, cfg.trusted_proxy_hops) {
            (None, 0) => Vec::new(),
            (None, hops) => {
                return Err(ConfigError::new(
                    list_path,
                    format!(
                        "required when trusted_proxy_hops is {hops}: list the CIDRs of the \
                         proxies in front of the gateway, whose X-Forwarded-For is honoured \
                         (to trust every peer, list \"0.0.0.0/0\" and \"::/0\")"
                    ),
                ))
            }
            (Some(list), _) if list.is_empty() => {
                return Err(ConfigError::new(
                    list_path,
                    "an empty list trusts no proxy; list the proxies' CIDRs, or remove it and \
                     set trusted_proxy_hops to 0",
                ))
            }
            (Some(_), 0) => {
                return Err(ConfigError::new(
                    list_path,
                    "has no effect while trusted_proxy_hops is 0 (X-Forwarded-For is never \
                     read): set trusted_proxy_hops to the number of proxies that append to it, \
                     or remove this list",
                ))
            }
            (Some(list), _) => parse_networks(list, &list_path)?,
        };
        Ok(Self {
            hops: usize::from(cfg.trusted_proxy_hops),
            trusted_proxies,
        })
    }

    pub fn trusted_proxy_hops(&self) -> usize {
        self.hops
    }

    /// Whether X-Forwarded-For from this peer (canonical form) is honoured.
    fn trusts(&self, peer: IpAddr) -> bool {
        self.hops > 0 && self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }

    /// May headers that only a proxy in front should write (forwarded client certificates) be
    /// believed from this peer? From any peer when no proxies are listed (the policy named the
    /// header as a source); once `trusted_proxies` is set, only from a listed proxy.
    pub fn forwarded_headers_from(&self, peer: Option<&str>) -> bool {
        self.trusted_proxies.is_empty() || self.is_trusted_proxy(peer)
    }

    /// Is this peer one of the listed `trusted_proxies` (never when none are listed)?
    pub fn is_trusted_proxy(&self, peer: Option<&str>) -> bool {
        peer.and_then(parse_address)
            .is_some_and(|ip| self.trusts(ip.to_canonical()))
    }
}

#[derive(Debug, Clone)]
pub struct IpFilterPolicy {
    allow: Option<Vec<IpNet>>,
    deny: Vec<IpNet>,
}

impl IpFilterPolicy {
    pub fn compile(cfg: &IpFilterConfig, path: &str) -> Result<Self, ConfigError> {
        if cfg.allow.is_none() && cfg.deny.is_none() {
            return Err(ConfigError::new(
                path,
                "needs an allow list, a deny list, or both",
            ));
        }
        let allow = match &cfg.allow {
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    join(path, "allow"),
                    "an empty allow list would refuse every client; remove it or list networks",
                ))
            }
            Some(list) => Some(parse_networks(list, &join(path, "allow"))?),
            None => None,
        };
        let deny = match &cfg.deny {
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    join(path, "deny"),
                    "an empty deny list is meaningless; remove it or list networks",
                ))
            }
            Some(list) => parse_networks(list, &join(path, "deny"))?,
            None => Vec::new(),
        };
        Ok(Self { allow, deny })
    }

    /// Deny wins over allow; a present allow list admits only its members.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        match &self.allow {
            Some(allow) => allow.iter().any(|n| n.contains(&ip)),
            None => true,
        }
    }
}

fn parse_networks(list: &[String], path: &str) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_network(s).map_err(|reason| ConfigError::new(index(path, i), reason)))
        .collect()
}

/// A CIDR (`203.0.113.0/24`, `2001:db8::/32`) or a single address. Host bits set in a CIDR are
/// refused: `203.0.113.7/24` is almost always a typo for a /32 or for `.0/24`.
fn parse_network(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = t
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    // IPv4-mapped IPv6 networks are compared as IPv4, like the addresses they hold.
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len().saturating_sub(96)) {
                    return Ok(IpNet::V4(n));
                }
            }
        }
    }
    Ok(net)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIpError {
    /// No peer address from Envoy, or not an IP address (should not happen on a TCP listener).
    NoPeer,
    /// From a trusted proxy: X-Forwarded-For missing, shorter than the configured hops, or not
    /// addresses where it is read.
    BadForwardedFor,
}

impl ClientIpError {
    pub fn reason(self) -> &'static str {
        match self {
            ClientIpError::NoPeer => "no peer address",
            ClientIpError::BadForwardedFor => "X-Forwarded-For missing or malformed",
        }
    }
}

/// The client IP: the connection's peer address; or, when the peer is one of the trusted
/// proxies and `trusted_proxy_hops = n > 0`, the address `n` entries from the right of
/// `X-Forwarded-For` (all occurrences joined in order, as one comma-separated list). Only the
/// peer is checked against the list: the `n - 1` entries to the right of the client were
/// written by proxies further out, which the hop count trusts. Every trusted entry must be an
/// address: garbage is refused, not skipped; entries further left may be anything.
pub fn client_ip(
    policy: &ClientIpPolicy,
    peer: Option<&str>,
    forwarded_for: &[&str],
) -> Result<IpAddr, ClientIpError> {
    let peer = peer
        .and_then(parse_address)
        .map(|ip| ip.to_canonical())
        .ok_or(ClientIpError::NoPeer)?;
    if !policy.trusts(peer) {
        return Ok(peer);
    }
    // Walk from the right: only the last `hops` entries are read, however long the header.
    let mut trusted = forwarded_for
        .iter()
        .rev()
        .flat_map(|v| v.rsplit(','))
        .take(policy.hops)
        .map(parse_address);
    let mut client = None;
    for _ in 0..policy.hops {
        client = Some(
            trusted
                .next()
                .flatten()
                .ok_or(ClientIpError::BadForwardedFor)?,
        );
    }
    client
        .map(|ip| ip.to_canonical())
        .ok_or(ClientIpError::BadForwardedFor)
}

/// `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]`, `[::1]:5678` (Envoy's `source.address` and
/// Azure's X-Forwarded-For both carry ports).
pub fn parse_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || port_ok(after.strip_prefix(':')?)) {
            return None;
        }
        return addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (addr, port) = s.rsplit_once(':')?;
    if !port_ok(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn port_ok(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>, deny: Option<&[&str]>) -> IpFilterPolicy {
        IpFilterPolicy::compile(
            &IpFilterConfig {
                allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
                deny: deny.map(|a| a.iter().map(|s| s.to_string()).collect()),
            },
            "apis[0].ip_filter",
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_over_allow_and_allow_list_is_exclusive() {
        let p = policy(
            Some(&["203.0.113.0/24", "2001:db8::/32"]),
            Some(&["203.0.113.7/32"]),
        );
        assert!(p.admits(ip("203.0.113.1")));
        assert!(!p.admits(ip("203.0.113.7")));
        assert!(!p.admits(ip("198.51.100.1")));
        assert!(p.admits(ip("2001:db8::1")));
        assert!(!p.admits(ip("2001:db9::1")));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert!(p.admits(ip("::ffff:203.0.113.1")));
        assert!(!p.admits(ip("::ffff:203.0.113.7")));
    }

    #[test]
    fn deny_only_admits_everyone_else() {
        let p = policy(None, Some(&["10.0.0.0/8", "::1"]));
        assert!(!p.admits(ip("10.1.2.3")));
        assert!(!p.admits(ip("::1")));
        assert!(p.admits(ip("192.0.2.1")));
    }

    #[test]
    fn bad_networks_name_the_entry() {
        for (bad, reason) in [
            ("300.1.1.1/24", "not an IP"),
            ("10.0.0.0/33", "not an IP"),
            ("203.0.113.7/24", "host bits"),
            ("", "not an IP"),
        ] {
            let err = IpFilterPolicy::compile(
                &IpFilterConfig {
                    allow: Some(vec!["10.0.0.0/8".into(), bad.into()]),
                    deny: None,
                },
                "apis[0].ip_filter",
            )
            .unwrap_err();
            assert_eq!(err.path, "apis[0].ip_filter.allow[1]");
            assert!(err.reason.contains(reason), "{bad}: {}", err.reason);
        }
        let err = IpFilterPolicy::compile(
            &IpFilterConfig {
                allow: Some(vec![]),
                deny: None,
            },
            "apis[0].ip_filter",
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].ip_filter.allow");
    }

    fn client_ip_policy(hops: u8, proxies: Option<&[&str]>) -> Result<ClientIpPolicy, ConfigError> {
        ClientIpPolicy::compile(
            &ClientIpConfig {
                trusted_proxy_hops: hops,
                trusted_proxies: proxies.map(|a| a.iter().map(|s| s.to_string()).collect()),
            },
            "client_ip",
        )
    }

    fn behind(hops: u8, proxies: &[&str]) -> ClientIpPolicy {
        client_ip_policy(hops, Some(proxies)).unwrap()
    }

    const PROXY: &str = "10.0.0.5:40000";

    #[test]
    fn client_ip_from_peer_strips_port() {
        let cfg = ClientIpPolicy::default();
        assert_eq!(
            client_ip(&cfg, Some("127.0.0.1:5555"), &[]),
            Ok(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(&cfg, Some("[::1]:5555"), &[]), Ok(ip("::1")));
        assert_eq!(
            client_ip(&cfg, Some("[::ffff:10.0.0.1]:1"), &[]),
            Ok(ip("10.0.0.1"))
        );
        // Without trusted hops, X-Forwarded-For is ignored entirely.
        assert_eq!(
            client_ip(&cfg, Some("127.0.0.1:1"), &["203.0.113.9"]),
            Ok(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(&cfg, None, &[]), Err(ClientIpError::NoPeer));
        for bad in [
            "",
            "pipe:/tmp/envoy.sock",
            "[fe80::1%eth0]:80",
            "10.0.0.1:x",
        ] {
            assert_eq!(
                client_ip(&cfg, Some(bad), &[]),
                Err(ClientIpError::NoPeer),
                "{bad}"
            );
        }
    }

    #[test]
    fn forwarded_for_from_a_trusted_proxy_counts_hops_from_the_right() {
        let one = behind(1, &["10.0.0.0/8"]);
        let two = behind(2, &["10.0.0.0/8"]);
        let xff = ["198.51.100.1, 203.0.113.5", "192.0.2.9:443"];
        assert_eq!(client_ip(&one, Some(PROXY), &xff), Ok(ip("192.0.2.9")));
        assert_eq!(client_ip(&two, Some(PROXY), &xff), Ok(ip("203.0.113.5")));
        assert_eq!(
            client_ip(&one, Some(PROXY), &["[2001:db8::1]:443"]),
            Ok(ip("2001:db8::1"))
        );
    }

    #[test]
    fn forwarded_for_from_any_other_peer_is_ignored() {
        let p = behind(1, &["10.0.0.0/8", "2001:db8:aa::/48"]);
        // A client that reaches the gateway directly cannot choose its address...
        assert_eq!(
            client_ip(&p, Some("198.51.100.7:5555"), &["203.0.113.9"]),
            Ok(ip("198.51.100.7"))
        );
        assert_eq!(
            client_ip(&p, Some("[2001:db8:bb::1]:5555"), &["10.0.0.1"]),
            Ok(ip("2001:db8:bb::1"))
        );
        // ...nor be refused for garbage it sent: the header is not read at all.
        for xff in [&["garbage"][..], &[""], &[], &["1.1.1.1", "x, y"]] {
            assert_eq!(
                client_ip(&p, Some("198.51.100.7:1"), xff),
                Ok(ip("198.51.100.7"))
            );
        }
        // A peer just outside the list is not a proxy.
        assert_eq!(
            client_ip(&p, Some("11.0.0.1:1"), &["203.0.113.9"]),
            Ok(ip("11.0.0.1"))
        );
        assert_eq!(
            client_ip(&p, Some("[2001:db8:aa::1]:1"), &["203.0.113.9"]),
            Ok(ip("203.0.113.9"))
        );
    }

    #[test]
    fn ipv4_mapped_peers_and_lists_compare_as_ipv4() {
        let v4_list = behind(1, &["10.0.0.0/8"]);
        let mapped_list = behind(1, &["::ffff:10.0.0.0/104"]);
        for p in [&v4_list, &mapped_list] {
            for peer in ["10.0.0.1:1", "[::ffff:10.0.0.1]:1", "[::ffff:a00:1]:1"] {
                assert_eq!(
                    client_ip(p, Some(peer), &["203.0.113.9"]),
                    Ok(ip("203.0.113.9")),
                    "{peer}"
                );
            }
            assert_eq!(
                client_ip(p, Some("[::ffff:11.0.0.1]:1"), &["203.0.113.9"]),
                Ok(ip("11.0.0.1"))
            );
        }
        // IPv6 `::/0` is not IPv4: trusting every peer needs both halves.
        let v6_only = behind(1, &["::/0"]);
        assert_eq!(
            client_ip(&v6_only, Some("[::ffff:10.0.0.1]:1"), &["203.0.113.9"]),
            Ok(ip("10.0.0.1"))
        );
        let v4_only = behind(1, &["0.0.0.0/0"]);
        assert_eq!(
            client_ip(&v4_only, Some("[2001:db8::1]:1"), &["203.0.113.9"]),
            Ok(ip("2001:db8::1"))
        );
        let everyone = behind(1, &["0.0.0.0/0", "::/0"]);
        for peer in ["10.0.0.1:1", "[::ffff:10.0.0.1]:1", "[2001:db8::1]:1"] {
            assert_eq!(
                client_ip(&everyone, Some(peer), &["203.0.113.9"]),
                Ok(ip("203.0.113.9"))
            );
        }
        // A mapped address in X-Forwarded-For is the IPv4 address too.
        assert_eq!(
            client_ip(&v4_list, Some(PROXY), &["::ffff:203.0.113.9"]),
            Ok(ip("203.0.113.9"))
        );
    }

    #[test]
    fn several_forwarded_for_headers_are_one_list_in_order() {
        let separate = ["1.1.1.1, 2.2.2.2", "3.3.3.3"];
        let joined = ["1.1.1.1, 2.2.2.2,3.3.3.3"];
        for (hops, want) in [(1, "3.3.3.3"), (2, "2.2.2.2"), (3, "1.1.1.1")] {
            let p = behind(hops, &["10.0.0.0/8"]);
            assert_eq!(client_ip(&p, Some(PROXY), &separate), Ok(ip(want)));
            assert_eq!(client_ip(&p, Some(PROXY), &joined), Ok(ip(want)));
        }
        // An empty header is an empty entry, joined or not.
        let p = behind(1, &["10.0.0.0/8"]);
        for xff in [&["1.1.1.1", ""][..], &["1.1.1.1,"]] {
            assert_eq!(
                client_ip(&p, Some(PROXY), xff),
                Err(ClientIpError::BadForwardedFor)
            );
        }
        assert_eq!(
            client_ip(&p, Some(PROXY), &["", "1.1.1.1"]),
            Ok(ip("1.1.1.1"))
        );
    }

    #[test]
    fn trusted_entries_must_be_addresses_whitespace_and_ports_aside() {
        let p = behind(2, &["10.0.0.0/8"]);
        for (xff, want) in [
            (" 9.9.9.9 ,\t2.2.2.2:80 , 3.3.3.3 ", "2.2.2.2"),
            ("x, [2001:db8::1]:443, 3.3.3.3", "2001:db8::1"),
            ("x, 2001:db8::1, [::1]", "2001:db8::1"),
            ("unknown, 2.2.2.2:0, 3.3.3.3:65535", "2.2.2.2"),
        ] {
            assert_eq!(client_ip(&p, Some(PROXY), &[xff]), Ok(ip(want)), "{xff}");
        }
        for garbage in [
            "evil",
            "",
            "1.2.3.4:",
            "1.2.3.4:123456",
            "1.2.3.4:80x",
            "[1.2.3.4]:80",
            "2001:db8::1]:80",
            "fe80::1%eth0",
            "\"1.2.3.4\"",
            "for=1.2.3.4",
            "010.0.0.1",
            "1.2.3",
            "1.2.3.4 5.6.7.8",
        ] {
            // Garbage is refused in the client's position and in a proxy's.
            for xff in [format!("{garbage}, 3.3.3.3"), format!("2.2.2.2, {garbage}")] {
                assert_eq!(
                    client_ip(&p, Some(PROXY), &[&xff]),
                    Err(ClientIpError::BadForwardedFor),
                    "{xff}"
                );
            }
            // Further left it is never read.
            let xff = format!("{garbage}, 2.2.2.2, 3.3.3.3");
            assert_eq!(client_ip(&p, Some(PROXY), &[&xff]), Ok(ip("2.2.2.2")));
        }
    }

    #[test]
    fn a_trusted_proxy_without_enough_forwarded_for_is_refused_not_taken_as_the_client() {
        let p = behind(2, &["10.0.0.0/8"]);
        assert_eq!(
            client_ip(&p, Some(PROXY), &["1.1.1.1"]),
            Err(ClientIpError::BadForwardedFor)
        );
        assert_eq!(
            client_ip(&p, Some(PROXY), &[]),
            Err(ClientIpError::BadForwardedFor)
        );
        let sixteen = behind(16, &["10.0.0.0/8"]);
        let fifteen = vec!["1.1.1.1"; 15];
        assert_eq!(
            client_ip(&sixteen, Some(PROXY), &fifteen),
            Err(ClientIpError::BadForwardedFor)
        );
        // No peer: nothing says the header came from a proxy.
        assert_eq!(
            client_ip(&p, None, &["1.1.1.1, 2.2.2.2"]),
            Err(ClientIpError::NoPeer)
        );
    }

    #[test]
    fn only_the_peer_is_checked_against_trusted_proxies() {
        // The hop count trusts the entries proxies further out wrote, as Envoy's
        // xff_num_trusted_hops does; only the connecting peer must be listed.
        let p = behind(2, &["10.0.0.0/8"]);
        assert_eq!(
            client_ip(&p, Some(PROXY), &["203.0.113.9, 198.51.100.7"]),
            Ok(ip("203.0.113.9"))
        );
    }

    #[test]
    fn a_long_forwarded_for_is_read_from_the_right_only() {
        let p = behind(1, &["10.0.0.0/8"]);
        let long = format!("{}9.9.9.9", "x,".repeat(100_000));
        assert_eq!(client_ip(&p, Some(PROXY), &[&long]), Ok(ip("9.9.9.9")));
        let many: Vec<&str> = std::iter::repeat_n("1.1.1.1", 1000).collect();
        assert_eq!(client_ip(&p, Some(PROXY), &many), Ok(ip("1.1.1.1")));
    }

    #[test]
    fn trusted_proxies_are_required_with_hops_and_meaningful_without() {
        for hops in [0, 1, 16] {
            let p = client_ip_policy(hops, Some(&["10.0.0.0/8"]));
            assert_eq!(p.is_ok(), hops > 0, "{hops}");
        }
        assert!(client_ip_policy(0, None).is_ok());
        let err = client_ip_policy(1, None).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxies");
        assert!(err.reason.contains("0.0.0.0/0"), "{}", err.reason);
        assert!(err.reason.contains("is 1: list"), "{}", err.reason);
        let err = client_ip_policy(0, Some(&["10.0.0.0/8"])).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxies");
        assert!(err.reason.contains("no effect"), "{}", err.reason);
        for hops in [0, 1] {
            let err = client_ip_policy(hops, Some(&[])).unwrap_err();
            assert_eq!(err.path, "client_ip.trusted_proxies");
            assert!(err.reason.contains("empty"), "{}", err.reason);
        }
        let err = client_ip_policy(17, Some(&["10.0.0.0/8"])).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxy_hops");
        let err = client_ip_policy(255, None).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxy_hops");
        // Every message reads as one line.
        for (hops, list) in [
            (1, None),
            (0, Some(&["10.0.0.0/8"][..])),
            (1, Some(&[][..])),
        ] {
            let err = client_ip_policy(hops, list).unwrap_err();
            assert!(!err.reason.contains("  "), "{}", err.reason);
        }
    }

    #[test]
    fn bad_trusted_proxies_name_the_entry() {
        for (bad, reason) in [
            ("10.0.0.0/33", "not an IP"),
            ("10.0.0.1/8", "host bits"),
            ("2001:db8::1/32", "host bits"),
            ("proxy.internal", "not an IP"),
            ("", "not an IP"),
            ("10.0.0.1:80", "not an IP"),
        ] {
            let err = client_ip_policy(1, Some(&["10.0.0.0/8", bad])).unwrap_err();
            assert_eq!(err.path, "client_ip.trusted_proxies[1]", "{bad}");
            assert!(err.reason.contains(reason), "{bad}: {}", err.reason);
        }
        // Single addresses are /32 and /128.
        let p = behind(1, &["10.0.0.5", "2001:db8::5"]);
        assert_eq!(client_ip(&p, Some(PROXY), &["9.9.9.9"]), Ok(ip("9.9.9.9")));
        assert_eq!(
            client_ip(&p, Some("10.0.0.6:1"), &["9.9.9.9"]),
            Ok(ip("10.0.0.6"))
        );
    }

    #[test]
    fn policy_errors_in_trusted_proxies_carry_path_and_line() {
        let no_env = |_: &str| None;
        let text = "{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/a\"}],\n\"client_ip\":{\"trusted_proxy_hops\":1,\n\"trusted_proxies\":[\"10.0.0.0/8\",\n\"10.0.0.1/8\"]}}";
        let err = crate::config::parse_policy(text.as_bytes(), &no_env).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxies[1]");
        assert_eq!(err.line, Some(4));
        let text =
            r#"{"apis":[{"name":"a","path_prefix":"/a"}],"client_ip":{"trusted_proxy_hops":1}}"#;
        let err = crate::config::parse_policy(text.as_bytes(), &no_env).unwrap_err();
        assert_eq!(err.path, "client_ip.trusted_proxies");
        let text = r#"{"apis":[{"name":"a","path_prefix":"/a"}],"client_ip":{"trusted_proxy_hops":1,"trusted_proxies":["0.0.0.0/0","::/0"]}}"#;
        let p = crate::config::parse_policy(text.as_bytes(), &no_env).unwrap();
        assert_eq!(p.client_ip.trusted_proxy_hops(), 1);
    }
}
