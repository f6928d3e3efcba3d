//! HTTP pieces shared by every service that speaks HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A client error with the JSON body every Weir API uses: `{"error": "...", "field": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics_router() -> Router {
    let handle = crate::telemetry::prometheus();
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
            }
        }),
    )
}

/// Serves `router` on `listener` until `token` is cancelled, then lets in-flight requests
/// finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    token: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { token.cancelled().await })
    .await
}

/// Serves only `/metrics` (for services whose own protocol is not HTTP).
pub async fn serve_metrics(listener: TcpListener, token: CancellationToken) -> std::io::Result<()> {
    serve(listener, metrics_router(), token).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_body_names_the_field() {
        let err = ApiError::bad_request("must be a UUID").with_field("key");
        let body = serde_json::to_value(&err).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "must be a UUID", "field": "key"})
        );
    }

    #[test]
    fn api_error_without_field_omits_it() {
        let body = serde_json::to_value(ApiError::bad_request("bad")).unwrap();
        assert_eq!(body, serde_json::json!({"error": "bad"}));
    }
}
