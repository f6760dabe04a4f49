//! Errors as RabbitMQ's management API reports them: a JSON object `{"error", "reason"}` with
//! the status RabbitMQ uses, or an empty body where RabbitMQ sends none.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The realm RabbitMQ's management plugin names in `WWW-Authenticate`.
pub const REALM: &str = "Basic realm=\"RabbitMQ Management\"";

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// A JSON error body.
    Json {
        status: StatusCode,
        error: &'static str,
        reason: Value,
    },
    /// No credentials: 401 with an empty body and a challenge.
    NoCredentials,
    /// Wrong credentials: 401 with a challenge and `not_authorized`.
    LoginFailed,
    /// A status with an empty body (an `Authorization` header that is not Basic base64).
    Empty(StatusCode),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<Value>) -> Self {
        Self::Json {
            status,
            error,
            reason: reason.into(),
        }
    }

    /// 404 `Object Not Found`: a missing object, path or vhost.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Object Not Found", "Not Found")
    }

    /// 404 `not_found` with a reason (creating something in a missing vhost, and the like).
    pub fn not_found_because(reason: impl Into<Value>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", reason)
    }

    pub fn vhost_not_found() -> Self {
        Self::not_found_because("vhost_not_found")
    }

    pub fn bad_request(reason: impl Into<Value>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// Refuses a name that AMQP could never carry (a short string holds 255 bytes), in
    /// RabbitMQ's words for queue names. RabbitMQ refuses only those; Warren refuses exchange
    /// and vhost names too, since no AMQP client could use them. User names are not short
    /// strings (SASL PLAIN carries them in a long string): any length is accepted.
    pub fn check_name(what: &str, name: &str) -> ApiResult<()> {
        if name.len() > 255 {
            return Err(Self::bad_request(format!(
                "{what} should be less than 255 bytes, actually was {}\n",
                name.len()
            )));
        }
        Ok(())
    }

    /// RabbitMQ's list of missing keys: `[{key_missing,read}]`.
    pub fn keys_missing(keys: &[&str]) -> Self {
        let listed: Vec<String> = keys
            .iter()
            .map(|k| format!("{{key_missing,{k}}}"))
            .collect();
        Self::bad_request(format!("[{}]", listed.join(",")))
    }

    /// 401 `not_authorised`: authenticated, but not allowed.
    pub fn not_authorised(reason: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "not_authorised", reason)
    }

    pub fn access_refused() -> Self {
        Self::not_authorised("Access refused.")
    }

    /// 503: the broker could not answer now (a node or a majority out of reach, no answer in
    /// time); the same request may succeed later.
    pub fn unavailable(reason: impl Into<Value>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            reason,
        )
    }

    pub fn internal(reason: impl Into<Value>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", reason)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Json { status, .. } => *status,
            Self::NoCredentials | Self::LoginFailed => StatusCode::UNAUTHORIZED,
            Self::Empty(status) => *status,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Json {
                status,
                error,
                reason,
            } => json_response(status, &json!({"error": error, "reason": reason})),
            Self::NoCredentials => {
                let mut r = StatusCode::UNAUTHORIZED.into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
                r
            }
            Self::LoginFailed => {
                let mut r = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "not_authorized", "reason": "Login failed"}),
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
                r
            }
            Self::Empty(status) => status.into_response(),
        }
    }
}

/// A JSON body with `content-type: application/json` (no charset, as RabbitMQ) and
/// `cache-control: no-cache`.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response()
}

/// 200 with a JSON body.
pub fn ok(body: Value) -> Response {
    json_response(StatusCode::OK, &body)
}

/// 201 (created) or 204 (updated), with no body.
pub fn created_or_updated(created: bool) -> Response {
    if created {
        StatusCode::CREATED.into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    }
}

pub fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}
