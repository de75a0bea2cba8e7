//! `<ip-filter>`: addresses and address ranges (as CIDR blocks) become `ip_filter.allow` or
//! `ip_filter.deny`.

use std::net::IpAddr;

use gateguard_core::ip_filter::{IpFilterConfig, IpFilterPolicy};
use ipnet::{Ipv4Subnets, Ipv6Subnets};
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{elements, literal, text_of};
use super::Cx;

/// What an `<ip-filter>` lists.
#[derive(Default)]
struct Entries {
    /// Addresses and CIDR blocks, without repeats.
    list: Vec<String>,
    addresses: usize,
    ranges: usize,
}

impl Cx<'_, '_> {
    pub(super) fn ip_filter(&mut self, node: Node, e: &El) {
        let action = node.attribute("action").unwrap_or("").trim();
        let allow = match action {
            "allow" => true,
            "forbid" => false,
            _ => {
                return self.report.skip(
                    e,
                    format!("action {action:?} is not \"allow\" or \"forbid\" (policy expressions are not evaluated)"),
                )
            }
        };
        if allow && self.api.ip_allow.is_some() {
            // Two allow-lists in sequence admit only their intersection.
            return self.report.skip(
                e,
                "a second <ip-filter action=\"allow\">: APIM admits only addresses in both \
                 lists; merge them into one",
            );
        }
        let entries = match self.entries(node) {
            Ok(entries) if entries.list.is_empty() => {
                return self.report.skip(e, "no <address> or <address-range>")
            }
            Ok(entries) => entries,
            Err(reason) => return self.report.skip(e, reason),
        };
        let (field, config) = if allow {
            let allow = Some(entries.list.clone());
            ("allow", IpFilterConfig { allow, deny: None })
        } else {
            let deny = Some(entries.list.clone());
            ("deny", IpFilterConfig { allow: None, deny })
        };
        let compile = |c: &IpFilterConfig| IpFilterPolicy::compile(c, "ip_filter");
        if self.compiled(e, config, compile).is_none() {
            return;
        }
        let n = entries.list.len();
        if allow {
            self.api.ip_allow = Some(entries.list);
        } else {
            for cidr in entries.list {
                if !self.api.ip_deny.contains(&cidr) {
                    self.api.ip_deny.push(cidr);
                }
            }
        }
        self.report.converted(
            e,
            format!(
                "ip_filter.{field} ({} address{}, {} range{} -> {n} entr{})",
                entries.addresses,
                if entries.addresses == 1 { "" } else { "es" },
                entries.ranges,
                plural(entries.ranges),
                if n == 1 { "y" } else { "ies" }
            ),
        );
    }

    /// The addresses and ranges of an `<ip-filter>`; any that is not literal refuses it whole.
    fn entries(&self, node: Node) -> Result<Entries, String> {
        let mut entries = Entries::default();
        for n in elements(node) {
            let c = self.el(n);
            let result = match c.name.as_str() {
                "address" => {
                    entries.addresses += 1;
                    literal(&text_of(n)).and_then(|a| {
                        a.parse::<IpAddr>()
                            .map(|ip| vec![ip.to_string()])
                            .map_err(|_| format!("{a:?} is not an IP address"))
                    })
                }
                "address-range" => {
                    entries.ranges += 1;
                    let from = n.attribute("from").unwrap_or("");
                    let to = n.attribute("to").unwrap_or("");
                    range_to_cidrs(from.trim(), to.trim())
                }
                other => Err(format!("unknown child <{other}>")),
            };
            let list = result.map_err(|reason| {
                format!(
                    "<{}> on line {}: {reason}; the whole filter was left out",
                    c.name, c.line
                )
            })?;
            for cidr in list {
                if !entries.list.contains(&cidr) {
                    entries.list.push(cidr);
                }
            }
        }
        Ok(entries)
    }
}

/// The smallest list of CIDR blocks covering exactly `from`..=`to` (both IPv4 or both IPv6).
fn range_to_cidrs(from: &str, to: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| {
        literal(s).and_then(|v| {
            v.parse::<IpAddr>()
                .map_err(|_| format!("{v:?} is not an IP address"))
        })
    };
    match (parse(from)?, parse(to)?) {
        (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
            Ok(Ipv4Subnets::new(a, b, 0).map(|n| n.to_string()).collect())
        }
        (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
            Ok(Ipv6Subnets::new(a, b, 0).map(|n| n.to_string()).collect())
        }
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            Err(format!("from {from} is after to {to}"))
        }
        _ => Err(format!("{from} and {to} are not the same IP version")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn cidrs(from: &str, to: &str) -> Vec<String> {
        range_to_cidrs(from, to).unwrap()
    }

    #[test]
    fn range_to_cidr_ipv4() {
        // Microsoft's ip-filter example.
        assert_eq!(
            cidrs("13.66.140.128", "13.66.140.143"),
            ["13.66.140.128/28"]
        );
        assert_eq!(cidrs("10.0.0.5", "10.0.0.5"), ["10.0.0.5/32"]);
        assert_eq!(
            cidrs("10.0.0.1", "10.0.0.10"),
            [
                "10.0.0.1/32",
                "10.0.0.2/31",
                "10.0.0.4/30",
                "10.0.0.8/31",
                "10.0.0.10/32"
            ]
        );
        assert_eq!(
            cidrs("192.168.0.255", "192.168.2.0"),
            ["192.168.0.255/32", "192.168.1.0/24", "192.168.2.0/32"]
        );
        assert_eq!(cidrs("0.0.0.0", "255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(
            cidrs("255.255.255.254", "255.255.255.255"),
            ["255.255.255.254/31"]
        );
        assert_eq!(cidrs("0.0.0.0", "0.0.0.0"), ["0.0.0.0/32"]);
        assert_eq!(
            cidrs("203.0.113.0", "203.0.114.127"),
            ["203.0.113.0/24", "203.0.114.0/25"]
        );
    }

    #[test]
    fn range_to_cidr_covers_exactly() {
        // Every block lies inside the range, blocks are adjacent, and none could be merged.
        for (from, to) in [
            (1u32, 1000u32),
            (7, 8),
            (123_456, 9_876_543),
            (0, 4_294_967_294),
        ] {
            let (a, b) = (std::net::Ipv4Addr::from(from), std::net::Ipv4Addr::from(to));
            let blocks = cidrs(&a.to_string(), &b.to_string());
            let mut next = u128::from(from);
            for block in &blocks {
                let net: ipnet::Ipv4Net = block.parse().unwrap();
                let (base, len) = (u128::from(u32::from(net.network())), net.prefix_len());
                assert_eq!(base, next);
                let size = 1u128 << (32 - len);
                assert_eq!(base % size, 0, "aligned");
                next = base + size;
            }
            assert_eq!(next, u128::from(to) + 1);
            assert!(blocks.len() <= 62);
        }
    }

    #[test]
    fn range_to_cidr_ipv6() {
        assert_eq!(cidrs("2001:db8::", "2001:db8::ffff"), ["2001:db8::/112"]);
        assert_eq!(
            cidrs("2001:db8::1", "2001:db8::4"),
            ["2001:db8::1/128", "2001:db8::2/127", "2001:db8::4/128"]
        );
        assert_eq!(
            cidrs("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ["::/0"]
        );
        assert_eq!(
            cidrs("2001:db8::", "2001:db9:ffff:ffff:ffff:ffff:ffff:ffff"),
            ["2001:db8::/31"]
        );
        assert!(range_to_cidrs("10.0.0.1", "2001:db8::1").is_err());
        assert!(range_to_cidrs("10.0.0.9", "10.0.0.1").is_err());
        assert!(range_to_cidrs("10.0.0", "10.0.0.1").is_err());
        assert!(range_to_cidrs("{{low}}", "10.0.0.1").is_err());
    }
}
