//! [`ApiError`]: the one request-level error, answered as the Confluent REST Proxy does,
//! `{"error_code":<int>,"message":<string>}`, with a message that never carries an internal
//! cause (the cause is logged instead).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// `Content-Type` of v2 answers.
pub const V2_JSON: &str = "application/vnd.kafka.v2+json";
/// `Content-Type` of v3 answers.
pub const JSON: &str = "application/json";

/// Confluent's error codes, as its REST Proxy answers them.
pub mod codes {
    /// Topic not found.
    pub const TOPIC_NOT_FOUND: u32 = 40401;
    /// Partition not found.
    pub const PARTITION_NOT_FOUND: u32 = 40402;
    /// A schema format request with keys but no key schema.
    pub const KEY_SCHEMA_MISSING: u32 = 42201;
    /// A schema format request with values but no value schema.
    pub const VALUE_SCHEMA_MISSING: u32 = 42202;
    /// The body is not JSON of the expected shape.
    pub const JSON_CONVERSION: u32 = 42203;
    /// The body is JSON of the right shape but holds a bad value.
    pub const INVALID_PAYLOAD: u32 = 42206;
    /// Kafka refused a record for good.
    pub const KAFKA_ERROR: u32 = 50002;
    /// Kafka refused a record, or did not answer in time; a retry may succeed.
    pub const KAFKA_RETRIABLE: u32 = 50003;
}

/// The JSON body of an error.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// Confluent error code (an HTTP status, or a 5-digit code starting with one).
    pub error_code: u32,
    /// What went wrong, for the caller.
    pub message: String,
}

/// A request-level error.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: ErrorBody,
    /// `Retry-After` seconds, on 429.
    pub retry_after: Option<u64>,
    /// `Content-Type` of the answer.
    pub content_type: &'static str,
    /// Add `WWW-Authenticate` (401).
    pub challenge: bool,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, error_code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error_code,
                message: message.into(),
            },
            retry_after: None,
            content_type: V2_JSON,
            challenge: false,
        }
    }

    /// As Jersey answers a bare HTTP error: code = status, message `HTTP <code> <reason>`.
    pub fn http(status: StatusCode) -> Self {
        let message = format!(
            "HTTP {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        Self::new(status, u32::from(status.as_u16()), message)
    }

    /// 404 40401.
    pub fn topic_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            codes::TOPIC_NOT_FOUND,
            "Topic not found.",
        )
    }

    /// 404 40402.
    pub fn partition_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            codes::PARTITION_NOT_FOUND,
            "Partition not found.",
        )
    }

    /// 422 42203: the body is not JSON of the expected shape.
    pub fn json_conversion(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::JSON_CONVERSION,
            format!("Conversion of JSON to Object failed: {detail}"),
        )
    }

    /// 422 42206: a value in the body is not acceptable.
    pub fn invalid_payload(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::INVALID_PAYLOAD,
            format!("Payload error. {cause}"),
        )
    }

    /// 429 with `Retry-After`.
    pub fn too_many_requests(retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            429,
            "Too many requests: the proxy is producing as much as it may hold; retry later.",
        );
        e.retry_after = Some(retry_after_s.max(1));
        e
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            413,
            format!("Request body is larger than the proxy's limit of {limit} bytes."),
        )
    }

    /// 401 with a challenge.
    pub fn unauthorized() -> Self {
        let mut e = Self::http(StatusCode::UNAUTHORIZED);
        e.challenge = true;
        e
    }

    /// 500 50002 for metadata that could not be read; the cause is logged, not answered.
    pub fn metadata(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "cannot read cluster metadata");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::KAFKA_ERROR,
            "Kafka error: the cluster's metadata could not be read.",
        )
    }

    /// 500 for a fault of the proxy itself; the cause is logged, not answered.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::http(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The same error with a v3 (`application/json`) content type.
    pub fn v3(mut self) -> Self {
        self.content_type = JSON;
        self
    }

    /// The same error with the given content type.
    pub fn with_content_type(mut self, ct: &'static str) -> Self {
        self.content_type = ct;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.challenge {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"chaperone-rest-proxy\", Bearer"),
            );
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_confluents() {
        let e = ApiError::topic_not_found();
        assert_eq!(
            serde_json::to_string(&e.body).unwrap(),
            r#"{"error_code":40401,"message":"Topic not found."}"#
        );
        let e = ApiError::http(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            serde_json::to_string(&e.body).unwrap(),
            r#"{"error_code":415,"message":"HTTP 415 Unsupported Media Type"}"#
        );
    }
}
