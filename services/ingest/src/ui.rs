//! The dashboard at `/ui/`: a page built with Vite from `ui/` (TypeScript and Chart.js)
//! whose files are compiled into the binary, so that it is served with no internet and no
//! other server. It reads the documented API (`/v1/streams`, the aggregates) like any
//! client, with the API key its user types when ingest asks for one.

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use rust_embed::Embed;

use crate::error::ApiError;

/// The files of `ui/dist`.
#[derive(Embed)]
#[folder = "ui/dist"]
struct Assets;

/// Where the page lives.
pub const PREFIX: &str = "/ui/";

/// What the page may load: its own files and the API, nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `/ui` without the slash: the page's relative links need it.
pub async fn redirect() -> Redirect {
    Redirect::permanent(PREFIX)
}

/// A file of the page; `index.html` for the folder itself.
pub async fn file(uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().strip_prefix(PREFIX).unwrap_or_default();
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(file) = Assets::get(path) else {
        return ApiError::NoRoute(uri.path().to_owned()).into_response();
    };
    let etag = format!(
        "\"{}\"",
        file.metadata
            .sha256_hash()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    // Vite names the bundles after their content: they never change under one name.
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(header::CONTENT_TYPE, file.metadata.mimetype().to_owned())],
            file.data,
        )
            .into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}
