//! HTTP Basic authentication against the broker's users, and RabbitMQ's management tags:
//! `management` (and `policymaker`) see their own vhosts, `monitoring` sees everything,
//! `administrator` may change everything. Failures are 401, as RabbitMQ answers them.

use super::AppState;
use super::error::ApiError;
use crate::auth::User;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::net::SocketAddr;

/// The address of the HTTP client, set by the listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The authenticated user behind a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
}

fn has_tag(user: &User, tags: &[&str]) -> bool {
    user.tags.iter().any(|t| tags.contains(&t.as_str()))
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.user.name
    }

    pub fn is_admin(&self) -> bool {
        has_tag(&self.user, &["administrator"])
    }

    /// `monitoring` or `administrator`: sees every vhost, connection and channel.
    pub fn is_monitor(&self) -> bool {
        has_tag(&self.user, &["administrator", "monitoring"])
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not administrator user"))
        }
    }

    /// `policymaker` or `administrator`: may manage policies.
    pub fn require_policymaker(&self) -> Result<(), ApiError> {
        if has_tag(&self.user, &["administrator", "policymaker"]) {
            Ok(())
        } else {
            Err(ApiError::not_authorised(
                "User not authorised to access object",
            ))
        }
    }

    pub fn require_monitor(&self) -> Result<(), ApiError> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::not_authorised("Not monitor user"))
        }
    }

    /// Whether the user may work with the objects of `vhost` (it has permissions there).
    pub fn may_use_vhost(&self, state: &AppState, vhost: &str) -> bool {
        state
            .broker
            .users
            .permission(&self.user.name, vhost)
            .is_some()
    }

    /// 404 for a missing vhost, 401 for one the user has no access to.
    pub fn require_vhost(&self, state: &AppState, vhost: &str) -> Result<(), ApiError> {
        if state.broker.vhost(vhost).is_none() {
            return Err(ApiError::not_found());
        }
        if self.may_use_vhost(state, vhost) {
            Ok(())
        } else {
            Err(ApiError::not_authorised(
                "User not authorised to access virtual host",
            ))
        }
    }

    /// Whether the vhost shows in the user's lists of vhosts.
    pub fn sees_vhost(&self, state: &AppState, vhost: &str) -> bool {
        self.is_monitor() || self.may_use_vhost(state, vhost)
    }

    /// Whether the user sees a connection (its own, or any for monitors).
    pub fn sees_connection(&self, user: &str) -> bool {
        self.is_monitor() || user == self.user.name
    }
}

/// The user name and password of an HTTP Basic `Authorization` header.
pub(super) struct BasicCredentials {
    decoded: String,
    colon: usize,
}

impl BasicCredentials {
    pub(super) fn user(&self) -> &str {
        &self.decoded[..self.colon]
    }

    pub(super) fn password(&self) -> &str {
        &self.decoded[self.colon + 1..]
    }
}

/// Why an `Authorization` header gives no Basic credentials: RabbitMQ answers invalid base64
/// with 400, anything else with 401.
pub(super) enum NoCredentials {
    NotBase64,
    Invalid,
}

/// Reads an HTTP Basic `Authorization` header value.
pub(super) fn basic_credentials(
    value: &axum::http::HeaderValue,
) -> Result<BasicCredentials, NoCredentials> {
    let value = value.to_str().map_err(|_| NoCredentials::Invalid)?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .ok_or(NoCredentials::Invalid)?;
    let decoded = B64
        .decode(encoded.trim())
        .map_err(|_| NoCredentials::NotBase64)?;
    let decoded = String::from_utf8(decoded).map_err(|_| NoCredentials::Invalid)?;
    let colon = decoded.find(':').ok_or(NoCredentials::Invalid)?;
    Ok(BasicCredentials { decoded, colon })
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::NoCredentials);
        };
        let credentials = basic_credentials(value).map_err(|e| match e {
            NoCredentials::NotBase64 => ApiError::Empty(StatusCode::BAD_REQUEST),
            NoCredentials::Invalid => ApiError::LoginFailed,
        })?;
        let (name, password) = (credentials.user(), credentials.password());
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map_or_else(|| std::net::Ipv4Addr::LOCALHOST.into(), |c| c.0.0.ip());
        let user = state
            .broker
            .users
            .authenticate(name, password, peer)
            .map_err(|why| {
                tracing::info!(user = name, %peer, reason = %why, "HTTP login refused");
                ApiError::LoginFailed
            })?;
        if !has_tag(
            &user,
            &["administrator", "monitoring", "management", "policymaker"],
        ) {
            return Err(ApiError::not_authorised("Not management user"));
        }
        Ok(Self { user })
    }
}
