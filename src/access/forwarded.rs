//! Identities forwarded by a mesh proxy: Envoy's `x-forwarded-client-cert`
//! (Istio) and Linkerd's `l5d-client-id`. Believed only from peers inside
//! `trusted_proxies`; the caller of [`parse_xfcc`] decides that.
//!
//! XFCC, as Envoy writes it: elements separated by `,` (one per proxy hop,
//! the last added by the proxy next to us), each a `;`-separated list of
//! `Key=Value` pairs (`By`, `Hash`, `Cert`, `Chain`, `Subject`, `URI`, `DNS`;
//! `URI` and `DNS` may repeat). A value holding `,`, `;` or `"` is written in
//! double quotes, with `\"` and `\\` escaped inside. The parser is a single
//! linear pass with no recursion, and refuses anything else, so that the
//! fuzzer and a hostile header meet the same bounded code.

use std::fmt;

/// Longest header accepted (Envoy's whole request header block defaults to
/// 60 KiB; a certificate chain in `Chain=` may approach that).
pub const MAX_XFCC_LEN: usize = 64 * 1024;
/// Most elements (proxy hops) accepted.
pub const MAX_XFCC_ELEMENTS: usize = 32;

/// One element of an XFCC header: the client certificate one proxy saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XfccElement {
    /// The pairs in order, keys as written.
    pub pairs: Vec<(String, String)>,
}

impl XfccElement {
    /// Every value of `key` (ASCII case-insensitive), in order.
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The `URI=` values: the certificate's URI SANs (SPIFFE IDs).
    pub fn uris(&self) -> impl Iterator<Item = &str> {
        self.values("URI")
    }
}

/// Why an XFCC header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfccError {
    TooLong,
    TooManyElements,
    /// An empty element (`,,`, or a leading or trailing `,`).
    EmptyElement,
    /// A pair without `=`, or with an empty or non-token key.
    BadKey,
    /// A `"` opened and never closed, or a backslash at the end.
    UnterminatedQuote,
    /// Something other than `;`, `,` or the end after a closing quote, or a
    /// `"` inside an unquoted value.
    StrayQuote,
    /// A control character (other than tab): no HTTP header value holds one,
    /// so the header did not come from a proxy. Found by the fuzzer: a
    /// quoted `\r` survived while an unquoted one was trimmed away.
    ControlCharacter,
}

impl fmt::Display for XfccError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XfccError::TooLong => "is too long",
            XfccError::TooManyElements => "has too many elements",
            XfccError::EmptyElement => "has an empty element",
            XfccError::BadKey => "has a pair that is not Key=Value",
            XfccError::UnterminatedQuote => "has an unterminated quoted value",
            XfccError::StrayQuote => "has a misplaced double quote",
            XfccError::ControlCharacter => "holds a control character",
        })
    }
}

impl std::error::Error for XfccError {}

/// Parses an `x-forwarded-client-cert` value into its elements, first hop
/// first. Pure and total: any input gives a value or an error, in time
/// linear in its length.
pub fn parse_xfcc(input: &str) -> Result<Vec<XfccElement>, XfccError> {
    if input.len() > MAX_XFCC_LEN {
        return Err(XfccError::TooLong);
    }
    if input.chars().any(|c| c.is_control() && c != '\t') {
        return Err(XfccError::ControlCharacter);
    }
    let mut elements = Vec::new();
    let mut element = XfccElement::default();
    let mut rest = input;
    loop {
        // Key: up to `=`, trimmed of optional whitespace.
        let eq = rest.find(['=', ',', ';', '"']).ok_or(XfccError::BadKey)?;
        if rest.as_bytes()[eq] != b'=' {
            return Err(
                if element.pairs.is_empty() && rest[..eq].trim().is_empty() {
                    XfccError::EmptyElement
                } else {
                    XfccError::BadKey
                },
            );
        }
        let key = rest[..eq].trim();
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(XfccError::BadKey);
        }
        rest = &rest[eq + 1..];
        // Value: quoted, or up to the next `;` or `,`.
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err(XfccError::UnterminatedQuote),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => v.push(c),
                        None => return Err(XfccError::UnterminatedQuote),
                    },
                    Some((_, c)) => v.push(c),
                }
            };
            rest = quoted[end + 1..].trim_start();
            if !(rest.is_empty() || rest.starts_with([';', ','])) {
                return Err(XfccError::StrayQuote);
            }
            value = v;
        } else {
            let end = rest.find([';', ',']).unwrap_or(rest.len());
            let v = &rest[..end];
            if v.contains('"') {
                return Err(XfccError::StrayQuote);
            }
            value = v.trim().to_owned();
            rest = &rest[end..];
        }
        element.pairs.push((key.to_owned(), value));
        // Separator.
        match rest.as_bytes().first() {
            None => {
                elements.push(element);
                return Ok(elements);
            }
            Some(b';') => rest = &rest[1..],
            Some(_) => {
                // `,`: the next element.
                elements.push(std::mem::take(&mut element));
                if elements.len() >= MAX_XFCC_ELEMENTS {
                    return Err(XfccError::TooManyElements);
                }
                rest = &rest[1..];
            }
        }
    }
}

/// The SPIFFE IDs the proxy next to us vouches for: the `URI=` values of the
/// header's last element.
pub fn xfcc_last_uris(input: &str) -> Result<Vec<String>, XfccError> {
    let elements = parse_xfcc(input)?;
    Ok(elements
        .last()
        .map(|e| e.uris().map(str::to_owned).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(e: &XfccElement) -> Vec<(&str, &str)> {
        e.pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn control_characters_are_refused() {
        for bad in ["URI=\"\r\0x\"", "URI=a\nb", "URI=spiffe://a/b\u{85}"] {
            assert_eq!(parse_xfcc(bad), Err(XfccError::ControlCharacter), "{bad:?}");
        }
        assert!(parse_xfcc("URI=a\tb").is_ok());
    }

    #[test]
    fn envoys_examples_parse() {
        // From Envoy's documentation of the header.
        let one = r#"By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";URI=http://testclient.lyft.com"#;
        let e = parse_xfcc(one).unwrap();
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].values("Subject").collect::<Vec<_>>(),
            ["/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"]
        );
        assert_eq!(
            e[0].uris().collect::<Vec<_>>(),
            ["http://testclient.lyft.com"]
        );

        let two = r#"By=http://frontend.lyft.com;Hash=468e;URI=http://testclient.lyft.com,By=http://backend.lyft.com;Hash=9ba6;URI=http://frontend.lyft.com"#;
        assert_eq!(
            xfcc_last_uris(two).unwrap(),
            ["http://frontend.lyft.com"],
            "the last element is the hop next to us"
        );

        let dns = r#"By=spiffe://cluster.local/ns/b/sa/broker;Hash=abc;Subject="";URI=spiffe://cluster.local/ns/shop/sa/web;DNS=web.shop.svc;DNS=web"#;
        let e = parse_xfcc(dns).unwrap();
        assert_eq!(
            e[0].values("dns").collect::<Vec<_>>(),
            ["web.shop.svc", "web"]
        );
        assert_eq!(e[0].values("Subject").collect::<Vec<_>>(), [""]);
    }

    #[test]
    fn quoted_values_keep_separators_and_escapes() {
        let e = parse_xfcc(r#"Subject="CN=a, O=b; c \"q\" \\";URI=spiffe://x/y,URI="spiffe://z""#)
            .unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            pairs(&e[0]),
            [
                ("Subject", r#"CN=a, O=b; c "q" \"#),
                ("URI", "spiffe://x/y")
            ]
        );
        assert_eq!(pairs(&e[1]), [("URI", "spiffe://z")]);
    }

    #[test]
    fn a_forged_element_inside_quotes_is_not_an_element() {
        // A client-controlled Subject that tries to smuggle a later element.
        let h = r#"Subject="x\",URI=spiffe://evil";URI=spiffe://real"#;
        assert_eq!(xfcc_last_uris(h).unwrap(), ["spiffe://real"]);
    }

    #[test]
    fn malformed_headers_are_refused() {
        for (h, e) in [
            ("", XfccError::BadKey),
            ("URI", XfccError::BadKey),
            ("=x", XfccError::BadKey),
            ("U RI=x", XfccError::BadKey),
            ("URI=x,", XfccError::BadKey),
            (",URI=x", XfccError::EmptyElement),
            ("URI=x,,URI=y", XfccError::EmptyElement),
            ("URI=x;;Hash=y", XfccError::BadKey),
            ("URI=\"x", XfccError::UnterminatedQuote),
            ("URI=\"x\\", XfccError::UnterminatedQuote),
            ("URI=\"x\"y", XfccError::StrayQuote),
            ("URI=a\"b", XfccError::StrayQuote),
        ] {
            assert_eq!(parse_xfcc(h), Err(e), "{h:?}");
        }
        assert_eq!(
            parse_xfcc(&"URI=x,".repeat(40)),
            Err(XfccError::TooManyElements)
        );
        assert_eq!(
            parse_xfcc(&"a".repeat(MAX_XFCC_LEN + 1)),
            Err(XfccError::TooLong)
        );
    }

    #[test]
    fn an_element_without_uri_vouches_for_nothing() {
        assert_eq!(
            xfcc_last_uris("URI=spiffe://a,Hash=abc").unwrap(),
            Vec::<String>::new()
        );
    }
}
