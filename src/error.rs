//! Proxy errors and the one place that turns them into responses (DESIGN §4.4).
//!
//! The rule this file guards: a request the app may have seen is never answered with a retry
//! hint. Only failures that happened before any request byte reached the app get
//! `503 + Retry-After + Connection: close + x-drainproxy-not-forwarded`.

use std::io;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;

/// What a failed exchange with the app reports: hyper's errors, or the lean client's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header that marks a response as produced without forwarding the request, so a caller
/// knows that retrying it is safe even for POST. Its value is the reason.
pub const NOT_FORWARDED: &str = "x-drainproxy-not-forwarded";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("app refused the connection")]
    ConnectRefused(#[source] io::Error),
    #[error("connecting to the app timed out")]
    ConnectTimeout,
    #[error("connecting to the app failed")]
    Connect(#[source] io::Error),
    #[error("connection to the app closed before the request was written")]
    NotSent(#[source] BoxError),
    #[error("the drain has released; not forwarding")]
    Released,
    #[error("the app failed after the request was sent")]
    Upstream(#[source] BoxError),
    #[error("the app did not answer within upstream.request_timeout")]
    Timeout,
    /// A method a reverse proxy for one app has no use for: CONNECT asks for a tunnel to an
    /// arbitrary host. Answered 501, never forwarded, never worth a retry elsewhere.
    #[error("CONNECT is not supported: drainproxy is a reverse proxy in front of one app")]
    ConnectMethod,
    /// RFC 9112 §3.2: an HTTP/1.1 request without a `Host`, or any request with two, is a 400.
    /// Forwarded, the app would see a host the client never named.
    #[error("a request must carry exactly one Host header (HTTP/1.0 may omit it)")]
    BadHost,
}

/// Why a request got a retry hint instead of being forwarded (`drainproxy_retry_hints_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    ConnectRefused = 0,
    ConnectTimeout = 1,
    ConnectError = 2,
    NotSent = 3,
    Released = 4,
}

impl RetryReason {
    pub const ALL: [RetryReason; 5] =
        [Self::ConnectRefused, Self::ConnectTimeout, Self::ConnectError, Self::NotSent, Self::Released];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectError => "connect_error",
            Self::NotSent => "not_sent",
            Self::Released => "released",
        }
    }
}

/// Kinds of upstream failure (`drainproxy_upstream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    ConnectRefused = 0,
    ConnectTimeout = 1,
    ConnectError = 2,
    NotSent = 3,
    Response = 4,
    Timeout = 5,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 6] =
        [Self::ConnectRefused, Self::ConnectTimeout, Self::ConnectError, Self::NotSent, Self::Response, Self::Timeout];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectError => "connect_error",
            Self::NotSent => "not_sent",
            Self::Response => "response",
            Self::Timeout => "timeout",
        }
    }
}

impl ProxyError {
    /// `Some` exactly when the app cannot have seen the request.
    pub fn retry_reason(&self) -> Option<RetryReason> {
        match self {
            Self::ConnectRefused(_) => Some(RetryReason::ConnectRefused),
            Self::ConnectTimeout => Some(RetryReason::ConnectTimeout),
            Self::Connect(_) => Some(RetryReason::ConnectError),
            Self::NotSent(_) => Some(RetryReason::NotSent),
            Self::Released => Some(RetryReason::Released),
            Self::Upstream(_) | Self::Timeout | Self::ConnectMethod | Self::BadHost => None,
        }
    }

    pub fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        Some(match self {
            Self::ConnectRefused(_) => UpstreamErrorKind::ConnectRefused,
            Self::ConnectTimeout => UpstreamErrorKind::ConnectTimeout,
            Self::Connect(_) => UpstreamErrorKind::ConnectError,
            Self::NotSent(_) => UpstreamErrorKind::NotSent,
            Self::Upstream(_) => UpstreamErrorKind::Response,
            Self::Timeout => UpstreamErrorKind::Timeout,
            Self::Released | Self::ConnectMethod | Self::BadHost => return None,
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            _ if self.retry_reason().is_some() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ConnectMethod => StatusCode::NOT_IMPLEMENTED,
            Self::BadHost => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// The body of this error's response: what went wrong, in one line.
    pub fn body(&self) -> Bytes {
        Bytes::from(format!("{self}\n"))
    }

    /// The response for this error. `retry_after` is the preformatted `Retry-After` value.
    pub fn to_response(&self, retry_after: &HeaderValue) -> Response<ResponseBody> {
        let status = self.status();
        let mut res = Response::new(ResponseBody::full(self.body()));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if let Some(reason) = self.retry_reason() {
            h.insert(header::RETRY_AFTER, retry_after.clone());
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            h.insert(NOT_FORWARDED, HeaderValue::from_static(reason.as_str()));
        } else if matches!(self, Self::BadHost) {
            // The client is broken or hostile; its next request would be no better.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

/// Classifies a failed connect to the app.
pub fn connect_error(e: io::Error) -> ProxyError {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ProxyError::ConnectRefused(e),
        io::ErrorKind::TimedOut => ProxyError::ConnectTimeout,
        _ => ProxyError::Connect(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> ProxyError {
        ProxyError::ConnectRefused(io::Error::from(io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn unforwarded_requests_get_a_retry_hint() {
        let ra = HeaderValue::from_static("1");
        let res = refused().to_response(&ra);
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()[header::CONNECTION], "close");
        assert_eq!(res.headers()[NOT_FORWARDED], "connect_refused");
        let res = ProxyError::Released.to_response(&ra);
        assert_eq!(res.headers()[NOT_FORWARDED], "released");
    }

    #[test]
    fn requests_the_app_may_have_seen_never_get_a_retry_hint() {
        let ra = HeaderValue::from_static("1");
        let res = ProxyError::Timeout.to_response(&ra);
        assert_eq!(res.status(), 504);
        assert!(res.headers().get(header::RETRY_AFTER).is_none());
        assert!(res.headers().get(NOT_FORWARDED).is_none());
    }
}
