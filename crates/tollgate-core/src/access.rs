//! What a key may reach: its scopes (route groups and models) and where it may be used from
//! (an IP allowlist, judged on the client address worked out from trusted proxies).
//!
//! A scope is `*` (everything), a route group (`echo`: every route and model in the group) or a
//! group and one model (`openai:gpt-4o-mini`: that model only, on the group's LLM routes). Group
//! names cannot contain `:`, so everything after the first `:` is the model, colons included
//! (`openai:ft:gpt-4o:acme:1`).

use ipnet::IpNet;
use std::net::IpAddr;

/// Every group and model.
pub const ALL: &str = "*";

/// A scope split into its group and, when it names one, its model. `None` for `*`.
pub fn parse_scope(scope: &str) -> Option<(&str, Option<&str>)> {
    if scope == ALL {
        return None;
    }
    Some(match scope.split_once(':') {
        Some((group, model)) => (group, Some(model)),
        None => (scope, None),
    })
}

/// Whether any scope reaches the route group (wholly or for some of its models).
pub fn grants_group(scopes: &[String], group: &str) -> bool {
    scopes
        .iter()
        .any(|scope| parse_scope(scope).is_none_or(|(g, _)| g == group))
}

/// Whether the scopes allow `model` on the route group: `*`, the whole group, or that model.
pub fn grants_model(scopes: &[String], group: &str, model: &str) -> bool {
    scopes.iter().any(|scope| match parse_scope(scope) {
        None => true,
        Some((g, None)) => g == group,
        Some((g, Some(m))) => g == group && m == model,
    })
}

/// The models the scopes name on the group, for an error message. Empty when the whole group
/// (or everything) is granted.
pub fn models_granted<'a>(scopes: &'a [String], group: &str) -> Vec<&'a str> {
    scopes
        .iter()
        .filter_map(|scope| match parse_scope(scope) {
            Some((g, Some(model))) if g == group => Some(model),
            _ => None,
        })
        .collect()
}

/// Whether the client may use a key with this allowlist. An empty allowlist allows any address.
pub fn ip_allowed(allowlist: &[IpNet], client: IpAddr) -> bool {
    let client = client.to_canonical();
    allowlist.is_empty() || allowlist.iter().any(|net| net.contains(&client))
}

/// The client's address: the socket peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right (the nearest hop) leftwards, skipping trusted proxies;
/// the first address that is not one is the client. An entry that is not an address stops the
/// walk at the last trusted hop, which is then the client (a proxy sent us garbage, so nothing
/// to its left can be believed). `forwarded_for` holds the header values in arrival order.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted_proxy(*ip, trusted);
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    for value in forwarded_for.rev() {
        for entry in value.rsplit(',') {
            let Some(hop) = parse_hop(entry.trim()) else {
                return client;
            };
            client = hop;
            if !is_trusted(&client) {
                return client;
            }
        }
    }
    client
}

/// Whether `peer` (an IPv4-mapped IPv6 address read as the IPv4 it carries) is one of the
/// configured trusted proxies, whose forwarding headers may be believed.
pub fn is_trusted_proxy(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = peer.to_canonical();
    trusted.iter().any(|net| net.contains(&peer))
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_proxy_is_known_by_its_ipv4_address_even_when_mapped_into_ipv6() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        for peer in ["10.1.2.3", "::ffff:10.1.2.3"] {
            assert!(is_trusted_proxy(peer.parse().unwrap(), &trusted), "{peer}");
        }
        for peer in ["11.1.2.3", "::ffff:11.1.2.3", "2001:db8::1"] {
            assert!(!is_trusted_proxy(peer.parse().unwrap(), &trusted), "{peer}");
        }
        assert!(!is_trusted_proxy("10.1.2.3".parse().unwrap(), &[]));
    }
    use proptest::prelude::*;

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn scopes_reach_groups_and_models() {
        let all = scopes(&["*"]);
        let echo = scopes(&["echo"]);
        let one_model = scopes(&["openai:gpt-mini", "echo"]);
        assert!(grants_group(&all, "openai") && grants_model(&all, "openai", "x"));
        assert!(grants_group(&echo, "echo") && !grants_group(&echo, "openai"));
        assert!(grants_group(&one_model, "openai"));
        assert!(grants_model(&one_model, "openai", "gpt-mini"));
        assert!(!grants_model(&one_model, "openai", "gpt-large"));
        assert!(grants_model(&one_model, "echo", "anything"));
        assert_eq!(models_granted(&one_model, "openai"), vec!["gpt-mini"]);
        // A model with colons (fine-tuned names) belongs to the group before the first colon.
        let tuned = scopes(&["openai:ft:gpt:acme:1"]);
        assert!(grants_model(&tuned, "openai", "ft:gpt:acme:1"));
        assert!(!grants_group(&tuned, "ft"));
    }

    #[test]
    fn allowlists_match_v4_v6_and_mapped_addresses() {
        let list = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(ip_allowed(&list, ip("10.1.2.3")));
        assert!(!ip_allowed(&list, ip("127.0.0.1")));
        assert!(ip_allowed(&list, ip("2001:db8::1")));
        assert!(ip_allowed(&list, ip("::ffff:10.9.9.9")));
        assert!(ip_allowed(&[], ip("127.0.0.1")));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = nets(&["127.0.0.1/32", "192.168.0.0/16"]);
        let xff = |values: &[&'static str], peer: &str| {
            client_ip(ip(peer), values.iter().copied(), &trusted)
        };
        // Untrusted peer: the header is ignored.
        assert_eq!(xff(&["10.1.2.3"], "8.8.8.8"), ip("8.8.8.8"));
        // Trusted peer: the rightmost untrusted hop is the client; a spoofed left part is not.
        assert_eq!(xff(&["10.1.2.3"], "127.0.0.1"), ip("10.1.2.3"));
        assert_eq!(
            xff(&["6.6.6.6, 10.1.2.3, 192.168.1.1"], "127.0.0.1"),
            ip("10.1.2.3")
        );
        assert_eq!(
            xff(&["6.6.6.6", "10.1.2.3:443"], "127.0.0.1"),
            ip("10.1.2.3")
        );
        assert_eq!(xff(&["[2001:db8::7]:80"], "127.0.0.1"), ip("2001:db8::7"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(xff(&["10.1.2.3, junk"], "127.0.0.1"), ip("127.0.0.1"));
        assert_eq!(xff(&["junk, 192.168.1.1"], "127.0.0.1"), ip("192.168.1.1"));
        // No header, or only trusted hops: the nearest address.
        assert_eq!(xff(&[], "127.0.0.1"), ip("127.0.0.1"));
        assert_eq!(xff(&["192.168.1.1"], "127.0.0.1"), ip("192.168.1.1"));
        // An IPv4-mapped peer is the IPv4 address it maps.
        assert_eq!(xff(&["10.1.2.3"], "::ffff:127.0.0.1"), ip("10.1.2.3"));
    }

    proptest! {
        /// Whatever a client writes into the header, an untrusted peer is the client, and behind
        /// a trusted one the answer is the peer or an address the header names.
        #[test]
        fn client_ip_never_trusts_an_untrusted_peer(header in ".{0,80}", last in 0u8..=255) {
            let trusted = nets(&["127.0.0.0/8"]);
            let peer = IpAddr::from([8, 8, 8, last]);
            prop_assert_eq!(client_ip(peer, [header.as_str()].into_iter(), &trusted), peer);
            let local = ip("127.0.0.1");
            let behind = client_ip(local, [header.as_str()].into_iter(), &trusted);
            prop_assert!(
                behind == local || header.split(',').any(|e| parse_hop(e.trim()) == Some(behind))
            );
        }
    }
}
