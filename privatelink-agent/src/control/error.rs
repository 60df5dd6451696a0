//! API errors: an HTTP status, a stable machine-readable code, a message, and the offending field.
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code}: {message}{}", field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    /// Stable code, e.g. `invalid_name`, `not_found`, `not_allowlisted`.
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds to wait before trying again (`Retry-After`), for a 429 or 503.
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// 400 with the offending field.
    pub fn invalid(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status: 400,
            code,
            message: message.into(),
            field: Some(field.into()),
            retry_after: None,
        }
    }

    /// 409: the field is well-formed but conflicts with the objects the state holds (a backend
    /// outside the provider network, a subnet outside its network, a taken terminal port).
    pub fn conflicting(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status: 409,
            ..ApiError::invalid(code, field, message)
        }
    }

    /// 404 for an object a request field refers to, with that field.
    pub fn missing(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status: 404,
            ..ApiError::invalid(code, field, message)
        }
    }

    /// 404 without saying whether the object exists for someone else.
    pub fn not_found(kind: &str, id: &str) -> Self {
        ApiError::new(404, "not_found", format!("{kind} {id} not found"))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(409, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(403, code, message)
    }

    pub fn unauthorized() -> Self {
        ApiError::new(401, "unauthorized", "a valid bearer token is required")
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
