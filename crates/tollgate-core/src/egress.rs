//! Where Tollgate may send a request on a customer's word (a webhook endpoint's URL): never into
//! the network it runs in. A URL is parsed as browsers do (WHATWG), so every spelling of an
//! address (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`) comes out as the one address it is;
//! then each address it names, or its host resolves to, is refused if it is loopback, private,
//! link-local, CGNAT, multicast, documentation or otherwise not the public internet, including
//! an IPv6 form that carries such an IPv4 address (mapped, compatible, NAT64, 6to4). The
//! operator's allow-list admits chosen ranges (an on-premises receiver, tests on 127.0.0.1).
//! Pure: resolving, and connecting only to the addresses admitted, is the sender's.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a URL or an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("'{0}' is not a URL")]
    NotAUrl(String),
    #[error("only https URLs are accepted{}", if *.http_allowed { " (or http)" } else { "" })]
    Scheme { http_allowed: bool },
    #[error("a URL with a user name or password is not accepted")]
    Credentials,
    #[error("the URL names no host")]
    NoHost,
    #[error("{ip} is {why}, not an address on the public internet")]
    Address { ip: IpAddr, why: &'static str },
}

/// Where a checked URL points: an address already (checked), or a name to resolve (whose
/// addresses the sender checks with [`Guard::admit`] before every attempt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as parsed, normalised.
    pub url: String,
    pub host: Host,
    pub port: u16,
}

/// The rules for one deployment: whether plain http is allowed, and the private ranges the
/// operator admits.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub allow_http: bool,
    pub allowed: Vec<IpNet>,
}

impl Guard {
    /// Parses `text` and checks its scheme, credentials and, when the host is an address, the
    /// address.
    pub fn check_url(&self, text: &str) -> Result<Target, Refused> {
        let url = url::Url::parse(text.trim()).map_err(|_| Refused::NotAUrl(text.into()))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            _ => {
                return Err(Refused::Scheme {
                    http_allowed: self.allow_http,
                })
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused::Credentials);
        }
        let host = match url.host() {
            None => return Err(Refused::NoHost),
            Some(url::Host::Ipv4(ip)) => Host::Ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Host::Ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => Host::Name(name.trim_end_matches('.').to_string()),
        };
        if let Host::Ip(ip) = host {
            self.admit(ip)?;
        }
        let port = url.port_or_known_default().unwrap_or(443);
        Ok(Target {
            url: url.to_string(),
            host,
            port,
        })
    }

    /// Whether a request may go to `ip`: a public address, or one in an allowed range.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match not_public(ip) {
            Some(why) => Err(Refused::Address { ip, why }),
            None => Ok(()),
        }
    }

    /// The addresses a name resolved to, if every one is admitted: a name with one inside
    /// address among public ones is refused whole, so a resolver cannot be played.
    pub fn admit_all(&self, resolved: &[IpAddr]) -> Result<(), Refused> {
        if resolved.is_empty() {
            return Err(Refused::NoHost);
        }
        resolved.iter().try_for_each(|ip| self.admit(*ip))
    }
}

/// Why `ip` is not a public internet address, if it is not.
pub fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => not_public_v4(v4),
        IpAddr::V6(v6) => not_public_v6(v6),
    }
}

fn not_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => "in 0.0.0.0/8 (this network)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared address space (CGNAT, 100.64.0.0/10)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local (169.254.0.0/16, where cloud metadata lives)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 88, 99) => "6to4 relay anycast (192.88.99.0/24)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved (240.0.0.0/4, broadcast)",
        _ => return None,
    })
}

fn not_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // An IPv6 form that carries an IPv4 address reaches that address: judge it.
    if let Some(v4) = embedded_v4(ip) {
        return not_public_v4(v4);
    }
    let segments = ip.segments();
    Some(match segments[0] {
        _ if ip.is_unspecified() => "unspecified (::)",
        _ if ip.is_loopback() => "loopback",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast",
        0x2001 if segments[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x2001 if segments[1] < 0x0200 => "IETF protocol assignments (2001::/23)",
        0x0100 if segments[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        0x3fff if segments[1] < 0x1000 => "documentation (3fff::/20)",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address carries, in the forms that route to it: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`)
/// and 6to4 (`2002:aabb:ccdd::/16`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        // `::` and `::1` are themselves, not 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x64, 0xff9b, 1, _, _, _, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn refused_why(guard: &Guard, url: &str) -> String {
        match guard.check_url(url) {
            Err(e) => e.to_string(),
            Ok(target) => panic!("{url} was admitted as {target:?}"),
        }
    }

    #[test]
    fn every_spelling_of_an_inside_address_is_refused() {
        let guard = Guard {
            allow_http: true,
            allowed: Vec::new(),
        };
        for (url, why) in [
            ("http://127.0.0.1/", "loopback"),
            ("http://2130706433/", "loopback"),
            ("http://0x7f.1/", "loopback"),
            ("http://0177.0.0.1/", "loopback"),
            ("http://127.1/", "loopback"),
            ("http://0x7f000001/", "loopback"),
            ("http://[::1]/", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "loopback"),
            ("http://[::ffff:7f00:1]/", "loopback"),
            ("http://[::127.0.0.1]/", "loopback"),
            ("http://[64:ff9b::7f00:1]/", "loopback"),
            ("http://[64:ff9b:1::a9fe:a9fe]/", "link-local"),
            ("http://[2002:a9fe:a9fe::1]/", "link-local"),
            ("http://[2002:7f00:1::]/", "loopback"),
            ("http://0.0.0.0/", "this network"),
            ("http://[::]/", "unspecified"),
            ("http://10.1.2.3/", "private"),
            ("http://172.16.0.1/", "private"),
            ("http://172.31.255.255/", "private"),
            ("http://192.168.1.1/", "private"),
            ("http://169.254.169.254/latest/meta-data", "link-local"),
            ("http://100.64.0.1/", "CGNAT"),
            ("http://100.127.255.255/", "CGNAT"),
            ("http://192.0.2.10/", "documentation"),
            ("http://198.51.100.1/", "documentation"),
            ("http://203.0.113.9/", "documentation"),
            ("http://198.18.0.1/", "benchmarking"),
            ("http://224.0.0.1/", "multicast"),
            ("http://255.255.255.255/", "broadcast"),
            ("http://[fc00::1]/", "unique local"),
            ("http://[fd12:3456::1]/", "unique local"),
            ("http://[fe80::1]/", "link-local"),
            ("http://[ff02::1]/", "multicast"),
            ("http://[2001:db8::1]/", "documentation"),
        ] {
            let refused = refused_why(&guard, url);
            assert!(refused.contains(why), "{url}: {refused}");
        }
    }

    #[test]
    fn public_addresses_and_names_pass_and_the_url_comes_out_normalised() {
        let guard = Guard::default();
        for (url, host) in [
            (
                "https://93.184.215.14/hook",
                Host::Ip("93.184.215.14".parse().unwrap()),
            ),
            ("https://1.1.1.1/", Host::Ip("1.1.1.1".parse().unwrap())),
            (
                "https://172.32.0.1/",
                Host::Ip("172.32.0.1".parse().unwrap()),
            ),
            (
                "https://100.128.0.1/",
                Host::Ip("100.128.0.1".parse().unwrap()),
            ),
            (
                "https://[2606:4700::1111]/",
                Host::Ip("2606:4700::1111".parse().unwrap()),
            ),
            (
                "https://Hooks.Example.com./in",
                Host::Name("hooks.example.com".into()),
            ),
        ] {
            assert_eq!(guard.check_url(url).unwrap().host, host, "{url}");
        }
        let target = guard
            .check_url(" https://example.com:8443/a/../b ")
            .unwrap();
        assert_eq!(target.url, "https://example.com:8443/b");
        assert_eq!(target.port, 8443);
        assert_eq!(guard.check_url("https://example.com/").unwrap().port, 443);
    }

    #[test]
    fn a_url_is_refused_for_its_scheme_credentials_or_shape() {
        let strict = Guard::default();
        assert_eq!(
            strict.check_url("http://example.com/"),
            Err(Refused::Scheme {
                http_allowed: false
            })
        );
        for url in ["ftp://example.com/", "file:///etc/passwd", "gopher://x/"] {
            assert!(
                matches!(strict.check_url(url), Err(Refused::Scheme { .. })),
                "{url}"
            );
        }
        assert_eq!(
            strict.check_url("https://user:pw@example.com/"),
            Err(Refused::Credentials)
        );
        assert_eq!(
            strict.check_url("https://user@example.com/"),
            Err(Refused::Credentials)
        );
        for url in ["", "not a url", "https://", "//example.com/"] {
            assert!(strict.check_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn the_operators_allow_list_admits_its_ranges_and_nothing_else() {
        let guard = Guard {
            allow_http: true,
            allowed: vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.20.0.0/16".parse().unwrap(),
            ],
        };
        assert!(guard.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(guard.check_url("http://10.20.3.4/hook").is_ok());
        assert!(guard.check_url("http://10.21.0.1/hook").is_err());
        assert!(guard.check_url("http://169.254.169.254/").is_err());
    }

    #[test]
    fn a_name_is_admitted_only_if_every_address_it_resolves_to_is() {
        let guard = Guard::default();
        let public: IpAddr = "93.184.215.14".parse().unwrap();
        let inside: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(guard.admit_all(&[public]).is_ok());
        assert_eq!(
            guard.admit_all(&[public, inside]),
            Err(Refused::Address {
                ip: inside,
                why: "private (10.0.0.0/8)"
            })
        );
        assert_eq!(guard.admit_all(&[]), Err(Refused::NoHost));
    }
}
