//! Which address a request comes from when load balancers stand in front of the API.
//!
//! Behind a balancer every connection comes from the balancer, so a per-address rate limit
//! would put every client in one bucket. Balancers named in `--trusted-proxies` append the
//! address they received the request from to `X-Forwarded-For`; walking that list from the
//! right, past every trusted hop, gives the first address no trusted party vouches for
//! beyond: the client. Entries left of it were written by the client itself and are ignored,
//! so a client cannot pick its own bucket.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One address or network, as `10.0.0.7`, `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("\"{0}\" is not an IP address or network (e.g. 10.0.0.7 or 10.0.0.0/8)")]
    Syntax(String),
    #[error("\"{0}\" has a prefix longer than the address")]
    Prefix(String),
    #[error("\"{0}\" has address bits set beyond its prefix (did you mean {1}?)")]
    HostBits(String, String),
}

impl Cidr {
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(address) & mask == u32::from(network)
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(address) & mask == u128::from(network)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let text = text.trim();
        let syntax = || CidrError::Syntax(text.to_string());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address = IpAddr::from_str(address)
            .map_err(|_| syntax())?
            .to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) && !prefix.is_empty() => {
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= bits)
                    .ok_or_else(|| CidrError::Prefix(text.to_string()))?
            }
            Some(_) => return Err(syntax()),
        };
        let network = Cidr {
            network: mask(address, prefix),
            prefix,
        };
        if network.network != address {
            return Err(CidrError::HostBits(text.to_string(), network.to_string()));
        }
        Ok(network)
    }
}

fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u32::from(v4) & mask).to_be_bytes())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u128::from(v6) & mask).to_be_bytes())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The client address of a request that reached this process from `peer` with the given
/// `X-Forwarded-For` header values (in the order received).
pub fn client_address<'a>(
    trusted: &[Cidr],
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
) -> IpAddr {
    let mut current = peer.to_canonical();
    let hops = forwarded_for.rev().flat_map(|value| value.rsplit(','));
    for hop in hops {
        if !trusted.iter().any(|net| net.contains(current)) {
            return current;
        }
        match hop_address(hop) {
            Some(address) => current = address.to_canonical(),
            // A trusted proxy wrote something that is not an address: the proxy itself is
            // the last hop anyone vouches for.
            None => return current,
        }
    }
    current
}

/// The address of one `X-Forwarded-For` entry: bare (`7.7.7.7`, `2001:db8::1`) or with the
/// port some balancers add (`7.7.7.7:5555`, `[2001:db8::1]:5555`, `[2001:db8::1]`).
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(address) = IpAddr::from_str(hop) {
        return Some(address);
    }
    if let Ok(socket) = std::net::SocketAddr::from_str(hop) {
        return Some(socket.ip());
    }
    hop.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| std::net::Ipv6Addr::from_str(inner).ok())
        .map(IpAddr::V6)
}

/// The rate-limit bucket of a client address: the address itself for IPv4, its /64 for
/// IPv6, the smallest network a site is normally given; one host holds a whole /64 and could
/// otherwise take a new bucket with every request.
pub fn bucket(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(_) => mask(address.to_canonical(), 64),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(ip("10.200.3.4")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(
            net.contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped peers match IPv4 networks"
        );
        let single: Cidr = "192.168.1.5".parse().unwrap();
        assert!(single.contains(ip("192.168.1.5")));
        assert!(!single.contains(ip("192.168.1.6")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
    }

    #[test]
    fn bad_networks_are_refused_with_the_reason() {
        assert!(matches!("nope".parse::<Cidr>(), Err(CidrError::Syntax(_))));
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Prefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits(
                "10.0.0.1/8".into(),
                "10.0.0.0/8".into()
            ))
        );
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let client = client_address(&[], ip("10.0.0.1"), ["6.6.6.6"].into_iter());
        assert_eq!(client, ip("10.0.0.1"));
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client forged 1.1.1.1; the balancer appended the real 7.7.7.7.
        let client = client_address(&trusted, ip("10.0.0.2"), ["1.1.1.1, 7.7.7.7"].into_iter());
        assert_eq!(client, ip("7.7.7.7"));
        // Two trusted hops, and the header split over two lines.
        let client = client_address(
            &trusted,
            ip("10.0.0.2"),
            ["1.1.1.1, 7.7.7.7", "10.9.9.9"].into_iter(),
        );
        assert_eq!(client, ip("7.7.7.7"));
    }

    #[test]
    fn forwarded_entries_with_a_port_name_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        for (entry, client) in [
            ("7.7.7.7:5555", "7.7.7.7"),
            ("[2001:db8::7]:5555", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("2001:db8::7", "2001:db8::7"),
        ] {
            let found = client_address(&trusted, ip("10.0.0.2"), ["1.1.1.1", entry].into_iter());
            assert_eq!(found, ip(client), "{entry}");
        }
        // Through a trusted hop written with its port too.
        let found = client_address(
            &trusted,
            ip("10.0.0.2"),
            ["7.7.7.7:1, 10.0.0.9:2"].into_iter(),
        );
        assert_eq!(found, ip("7.7.7.7"));
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64_and_ipv4_ones_have_their_own() {
        assert_eq!(
            bucket(ip("2001:db8:1:2:aaaa::1")),
            bucket(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(bucket(ip("2001:db8:1:2::1")), bucket(ip("2001:db8:1:3::1")));
        assert_eq!(bucket(ip("2001:db8:1:2::1")), ip("2001:db8:1:2::"));
        assert_ne!(bucket(ip("7.7.7.7")), bucket(ip("7.7.7.8")));
        assert_eq!(bucket(ip("::ffff:7.7.7.7")), ip("7.7.7.7"));
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        let client = client_address(&trusted, ip("8.8.4.4"), ["1.1.1.1"].into_iter());
        assert_eq!(client, ip("8.8.4.4"));
    }

    #[test]
    fn garbage_or_a_missing_header_stops_at_the_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let client = client_address(&trusted, ip("10.0.0.2"), ["nonsense"].into_iter());
        assert_eq!(client, ip("10.0.0.2"));
        let client = client_address(&trusted, ip("10.0.0.2"), std::iter::empty());
        assert_eq!(client, ip("10.0.0.2"));
        // Every hop trusted: the leftmost is as close to the client as anyone knows.
        let client = client_address(&trusted, ip("10.0.0.2"), ["10.1.1.1"].into_iter());
        assert_eq!(client, ip("10.1.1.1"));
    }
}
