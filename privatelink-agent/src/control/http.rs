//! What the API takes from a request, strictly: JSON bodies that are objects with only known
//! fields, query strings and paths whose failures are API errors, and one JSON error shape for
//! every refusal (the router's own 404/405/413 included).
use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Query, Request},
    http::{HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::ApiError;

/// The largest request body, in bytes.
pub const BODY_LIMIT: usize = 1 << 20;

/// How long a request body may take to arrive (a request extension set by the server; this when
/// none is).
#[derive(Clone, Copy, Debug)]
pub struct BodyTimeout(pub Duration);

impl Default for BodyTimeout {
    fn default() -> Self {
        BodyTimeout(Duration::from_secs(10))
    }
}

/// A JSON body: a JSON object (`{...}`), every field known, within [`BODY_LIMIT`], arriving within
/// the body timeout. Each failure is an API error naming the field where there is one.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                let m = m.trim();
                m.eq_ignore_ascii_case("application/json")
                    || (m.len() > 5 && m[m.len() - 5..].eq_ignore_ascii_case("+json"))
            });
        if !json_type {
            return Err(ApiError::new(
                415,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(too_large());
        }
        let wait = req
            .extensions()
            .get::<BodyTimeout>()
            .copied()
            .unwrap_or_default();
        let bytes = match tokio::time::timeout(wait.0, Bytes::from_request(req, state)).await {
            Err(_) => {
                return Err(ApiError::new(
                    408,
                    "body_timeout",
                    format!(
                        "the body did not arrive within {} s (is Content-Length larger than the body?)",
                        wait.0.as_secs_f32()
                    ),
                ));
            }
            Ok(Err(rej)) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(too_large());
            }
            Ok(Err(rej)) => return Err(ApiError::new(400, "invalid_body", rej.body_text())),
            Ok(Ok(b)) => b,
        };
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(400, "invalid_json", format!("the body is not JSON: {e}"))
        })?;
        parse_object(value).map(Body)
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        413,
        "body_too_large",
        format!("request bodies are at most {BODY_LIMIT} bytes"),
    )
}

/// A JSON value as `T`, which must be an object: the error names the offending field.
pub fn parse_object<T: DeserializeOwned>(mut value: Value) -> Result<T, ApiError> {
    integral_numbers(&mut value);
    if !value.is_object() {
        let got = match &value {
            Value::Array(_) => "an array",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(ApiError::new(
            400,
            "invalid_json",
            format!("the body must be a JSON object, got {got}"),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // The path names the field, an unknown one included (`tags[0].kye`).
        let unknown = message.starts_with("unknown field `");
        let code = if unknown {
            "unknown_field"
        } else {
            "invalid_json"
        };
        let e = ApiError::new(400, code, message);
        if path.is_empty() || path == "." {
            e
        } else {
            e.with_field(path)
        }
    })
}

/// JSON has one number type: `3.0` is the integer 3 (as JSON Schema's `integer` says), so a
/// number with no fraction is taken as an integer wherever one is expected.
fn integral_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 {
                *v = Value::from(f as i64);
            } else if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 {
                *v = Value::from(f as u64);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(integral_numbers),
        Value::Object(o) => o.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// A query string; a failure is `400 invalid_query` naming the parameter.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Q(v)),
            Err(rej) => {
                let text = rej.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                let e = ApiError::new(400, "invalid_query", detail.to_string());
                Err(match detail.split_once(": ") {
                    Some((f, _)) if !f.contains(' ') => e.with_field(f),
                    _ => e,
                })
            }
        }
    }
}

/// Path parameters; a failure is `400 invalid_path`.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(P(v)),
            Err(rej) => Err(ApiError::new(400, "invalid_path", rej.body_text())),
        }
    }
}

/// Every refusal that is not already a JSON error (the router's 405, a layer's 413 or 408)
/// becomes one, keeping its status and headers (`Allow` on a 405).
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            format!(
                "this route answers {}",
                parts
                    .headers
                    .get(header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no method")
            ),
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            format!("request bodies are at most {BODY_LIMIT} bytes"),
        ),
        StatusCode::NOT_FOUND => ("no_route", "no such API route".to_string()),
        s if text.is_empty() => (
            "http_error",
            s.canonical_reason().unwrap_or("error").to_string(),
        ),
        _ => ("http_error", text),
    };
    let body = json!({ "error": { "code": code, "message": message } }).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        list: Vec<Inner>,
    }

    fn err(v: Value) -> ApiError {
        parse_object::<Outer>(v).unwrap_err()
    }

    #[test]
    fn bodies_are_objects_with_known_fields_and_errors_name_the_field() {
        assert!(parse_object::<Outer>(json!({ "name": "a" })).is_ok());
        let e = err(json!(["a", [], []]));
        assert_eq!((e.status, e.code), (400, "invalid_json"));
        assert!(e.message.contains("an array"), "{}", e.message);
        let e = err(json!({ "name": "a", "nmae": "b" }));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("nmae"))
        );
        let e = err(json!({ "name": "a", "inner": { "port": 1, "prot": 2 } }));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("inner.prot"))
        );
        let e = err(json!({ "name": "a", "list": [{ "port": 1 }, { "port": 70000 }] }));
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("invalid_json", Some("list[1].port"))
        );
        let e = err(json!({ "name": 5 }));
        assert_eq!(e.field.as_deref(), Some("name"));
        let ok: Outer = parse_object(json!({ "name": "a", "inner": { "port": 80.0 } })).unwrap();
        assert_eq!(ok.inner.unwrap().port, 80, "80.0 is the integer 80");
        let e = err(json!({ "name": "a", "inner": { "port": 80.5 } }));
        assert_eq!(e.field.as_deref(), Some("inner.port"));
        let e = err(json!({}));
        assert!(e.message.contains("missing field `name`"), "{}", e.message);
    }
}
