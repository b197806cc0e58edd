//! The responses the host writes: JSON, an error, plain text. Apart from
//! the server so that what answers a request (a source, the dispatcher)
//! need not depend on the server that carries it.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// The body type of every response.
pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_bytes(status, Bytes::from(value.to_string()))
}

/// `{}` with `status`: the answer daprd needs, without building a value.
pub fn empty_json(status: StatusCode) -> Response<Body> {
    json_bytes(status, Bytes::from_static(b"{}"))
}

fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// A JSON `{"error": ...}` response.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
