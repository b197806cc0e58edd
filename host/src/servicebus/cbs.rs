//! Claims-based security: `put-token` on `$cbs`.
//!
//! Every SDK puts a token for the entity it is about to use before it
//! attaches a link to it; the endpoint checks the token's signature against
//! the configured key (or, when told to, takes any token) and remembers
//! which entity paths this connection may use.

use super::request::{Request, Response};
use super::sas::{self, SasKey};
use super::wire;

/// How tokens are checked.
#[derive(Debug, Clone)]
pub enum Auth {
    /// SAS tokens signed with this key.
    Key(SasKey),
    /// Any token at all (for local tools that cannot sign).
    AcceptAny,
}

/// Answers a put-token request: the response, and the entity path it
/// grants, if it does.
pub fn put_token(auth: &Auth, request: &Request) -> (Response, Option<String>) {
    if request.property("operation") != Some("put-token") {
        return (Response::status(400, "the $cbs node takes put-token only"), None);
    }
    let Some(audience) = request.property("name").map(str::to_string) else {
        return (Response::status(400, "put-token without a name (the audience)"), None);
    };
    let token = match &request.body {
        serde_amqp::Value::Binary(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        other => wire::text(other).unwrap_or_default().to_string(),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let verdict = match auth {
        Auth::AcceptAny => Ok(()),
        Auth::Key(key) => sas::verify(&token, key, &audience, now),
    };
    match verdict {
        Ok(()) => (Response::status(202, "Accepted"), Some(sas::entity_path(&audience))),
        Err(error) => {
            tracing::info!(%audience, %error, "token refused");
            (
                Response::error(
                    401,
                    "amqp:unauthorized-access",
                    format!("InvalidSignature: the token is refused: {error}"),
                ),
                None,
            )
        }
    }
}
