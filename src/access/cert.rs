//! Workload identities in names: a verified client certificate's SANs, or
//! the names a trusted proxy forwards, against a caller's `spiffe_id` or
//! `dns_name`.
//!
//! SPIFFE IDs compare exactly (the path is case-sensitive); DNS names ASCII
//! case-insensitively and without a trailing dot. No wildcard matching: a
//! certificate for `*.shop.svc` matches only a caller configured with that
//! exact name, never `web.shop.svc`.

use crate::config::CallerIdentity;

use super::peer::PeerCert;

/// Whether `name` (a URI SAN or forwarded SPIFFE ID) is the caller's `spiffe_id`.
pub fn is_spiffe_id(identity: &CallerIdentity, name: &str) -> bool {
    matches!(identity, CallerIdentity::SpiffeId(id) if id == name)
}

/// Whether `name` (a DNS SAN or `l5d-client-id`) is the caller's `dns_name`.
pub fn is_dns_name(identity: &CallerIdentity, name: &str) -> bool {
    let norm = |s: &str| s.strip_suffix('.').unwrap_or(s).to_owned();
    matches!(identity, CallerIdentity::DnsName(n) if !n.is_empty() && norm(n).eq_ignore_ascii_case(&norm(name)))
}

/// Whether the certificate names the caller.
pub fn names(identity: &CallerIdentity, cert: &PeerCert) -> bool {
    cert.uri_sans.iter().any(|u| is_spiffe_id(identity, u))
        || cert.dns_sans.iter().any(|d| is_dns_name(identity, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_or_case_insensitively_for_dns() {
        let spiffe = CallerIdentity::SpiffeId("spiffe://cluster.local/ns/shop/sa/web".into());
        let dns = CallerIdentity::DnsName("web.shop.svc".into());
        let cert = |uri: &[&str], dns: &[&str]| PeerCert {
            uri_sans: uri.iter().map(|s| s.to_string()).collect(),
            dns_sans: dns.iter().map(|s| s.to_string()).collect(),
        };
        assert!(names(
            &spiffe,
            &cert(&["spiffe://cluster.local/ns/shop/sa/web"], &[])
        ));
        assert!(!names(
            &spiffe,
            &cert(&["spiffe://cluster.local/ns/shop/sa/Web"], &[])
        ));
        assert!(!names(
            &spiffe,
            &cert(&[], &["spiffe://cluster.local/ns/shop/sa/web"])
        ));
        assert!(names(&dns, &cert(&[], &["other", "WEB.shop.svc."])));
        assert!(!names(&dns, &cert(&[], &["*.shop.svc"])));
        assert!(
            !names(&dns, &cert(&["web.shop.svc"], &[])),
            "a URI SAN is no DNS name"
        );
        let token = CallerIdentity::TokenSha256([0; 32]);
        assert!(!names(&token, &cert(&["x"], &["x"])));
    }
}
