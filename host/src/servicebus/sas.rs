//! Shared Access Signature tokens, checked as Service Bus checks them.
//!
//! A token reads `SharedAccessSignature sr=<uri>&sig=<signature>&se=<expiry>&skn=<key name>`.
//! The signature is HMAC-SHA256, keyed with the UTF-8 bytes of the key text,
//! over `sr` exactly as it appears in the token (still percent-encoded:
//! the SDKs differ in how they encode it) + `\n` + `se`, base64-encoded.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key a namespace's clients sign with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasKey {
    pub name: String,
    pub key: String,
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a SharedAccessSignature token (missing {0})")]
    Malformed(&'static str),
    #[error("signed with key {given:?}, not {expected:?}")]
    UnknownKeyName { given: String, expected: String },
    #[error("expired")]
    Expired,
    #[error("the signature does not match the key")]
    BadSignature,
    #[error("issued for {resource}, which does not cover {audience}")]
    WrongResource { resource: String, audience: String },
}

/// Checks `token` against `key` at `now` (Unix seconds) for `audience` (the
/// entity URI the client asked for).
pub fn verify(token: &str, key: &SasKey, audience: &str, now: u64) -> Result<(), TokenError> {
    let fields = token.strip_prefix("SharedAccessSignature ").ok_or(TokenError::Malformed("the prefix"))?;
    let field = |name: &'static str| {
        fields
            .split('&')
            .find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
            .ok_or(TokenError::Malformed(name))
    };
    let (resource, signature, expiry, key_name) = (field("sr")?, field("sig")?, field("se")?, field("skn")?);
    if percent_decode(key_name) != key.name {
        return Err(TokenError::UnknownKeyName { given: percent_decode(key_name), expected: key.name.clone() });
    }
    if expiry.parse::<u64>().map_err(|_| TokenError::Malformed("a numeric se"))? <= now {
        return Err(TokenError::Expired);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(key.key.as_bytes()).map_err(|_| TokenError::BadSignature)?;
    mac.update(format!("{resource}\n{expiry}").as_bytes());
    let given = base64::engine::general_purpose::STANDARD
        .decode(percent_decode(signature))
        .map_err(|_| TokenError::BadSignature)?;
    mac.verify_slice(&given).map_err(|_| TokenError::BadSignature)?;
    let resource = percent_decode(resource);
    if !covers(&resource, audience) {
        return Err(TokenError::WrongResource { resource, audience: audience.to_string() });
    }
    Ok(())
}

/// Signs a token (for tests and tools that talk to the endpoint).
pub fn sign(resource: &str, key: &SasKey, expiry: u64) -> String {
    let encoded = percent_encode(resource);
    let signature = Hmac::<Sha256>::new_from_slice(key.key.as_bytes())
        .map(|mut mac| {
            mac.update(format!("{encoded}\n{expiry}").as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        })
        .unwrap_or_default();
    format!(
        "SharedAccessSignature sr={encoded}&sig={}&se={expiry}&skn={}",
        percent_encode(&signature),
        percent_encode(&key.name)
    )
}

/// The entity path of a URI (`sb://host:port/orders/$management` →
/// `orders/$management`), lower-cased: entity names are case-insensitive.
pub fn entity_path(uri: &str) -> String {
    let without_scheme = uri.split_once("://").map(|(_, rest)| rest.split_once('/').map(|(_, p)| p).unwrap_or(""));
    without_scheme.unwrap_or(uri).trim_matches('/').to_ascii_lowercase()
}

/// A token for `resource` covers `audience` when the resource's entity path
/// is a prefix of the audience's, segment by segment (the namespace root
/// covers everything).
pub fn covers(resource: &str, audience: &str) -> bool {
    let (resource, audience) = (entity_path(resource), entity_path(audience));
    resource.is_empty()
        || audience == resource
        || audience.strip_prefix(&resource).is_some_and(|rest| rest.starts_with('/'))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SasKey {
        SasKey { name: "RootManageSharedAccessKey".into(), key: "SAS_KEY_VALUE".into() }
    }

    #[test]
    fn a_signed_token_verifies_and_a_wrong_key_does_not() {
        let token = sign("sb://localhost:5672/orders", &key(), 2_000);
        assert_eq!(verify(&token, &key(), "amqp://localhost:5672/orders/$management", 1_000), Ok(()));
        let other = SasKey { key: "another".into(), ..key() };
        assert_eq!(verify(&token, &other, "sb://localhost:5672/orders", 1_000), Err(TokenError::BadSignature));
        assert_eq!(verify(&token, &key(), "sb://localhost:5672/orders", 3_000), Err(TokenError::Expired));
        assert!(matches!(
            verify(&token, &key(), "sb://localhost:5672/orders-poison", 1_000),
            Err(TokenError::WrongResource { .. })
        ));
        assert!(matches!(verify("Bearer x", &key(), "sb://x/orders", 0), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn the_signature_covers_sr_as_the_client_encoded_it() {
        // Go lower-cases the escapes, Python keeps `%3A`: both sign what they send.
        for sr in ["sb%3a%2f%2flocalhost%3a5672%2forders", "sb%3A%2F%2Flocalhost%3A5672%2Forders"] {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"SAS_KEY_VALUE").unwrap_or_else(|_| unreachable!());
            mac.update(format!("{sr}\n2000").as_bytes());
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            let token = format!(
                "SharedAccessSignature sr={sr}&sig={}&se=2000&skn=RootManageSharedAccessKey",
                percent_encode(&sig)
            );
            assert_eq!(verify(&token, &key(), "sb://localhost:5672/orders", 1_000), Ok(()), "{sr}");
        }
    }

    #[test]
    fn resources_cover_their_sub_entities_only() {
        assert!(covers("sb://localhost/", "amqp://localhost:5672/anything"));
        assert!(covers("sb://h/Orders", "sb://h/orders/$DeadLetterQueue"));
        assert!(!covers("sb://h/orders", "sb://h/orders2"));
    }
}
