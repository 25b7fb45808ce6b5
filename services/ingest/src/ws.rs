//! The WebSocket door: `GET /v1/streams/{stream}/ws`.
//!
//! Each text message is one event (a JSON object) or a batch (a JSON array). Messages are
//! handled one after another, and each is answered, in order, with
//! `{"ok": true, "ids": [...]}` once Kafka acknowledged its events, or with
//! `{"ok": false, "error": <problem>}`. A bad message gets its error and the connection
//! stays open; binary messages are refused the same way. Messages and frames are limited
//! to `--max-body-bytes`. On shutdown the server closes the connection after the message
//! in hand is answered.
//!
//! The acknowledgement level is the connection's: `?ack=sink` (with `&timeout=`) answers
//! each message once the stream's collectors wrote its events, with `"sink": "written"`,
//! or `"sink": "pending"` and the ids not confirmed in time; a dead-lettered event answers
//! `{"ok": false}` with the collector's reason. `?ack=none` answers once queued.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::App;
use crate::error::ApiError;
use crate::http::PublishQuery;
use crate::input;
use crate::publish::{Ack, Hints, SinkState, Stream};

/// Publish events over a WebSocket.
///
/// A WebSocket handshake (`Connection: Upgrade`, `Upgrade: websocket`,
/// `Sec-WebSocket-Version: 13`, `Sec-WebSocket-Key`). Each text message is an event or a
/// JSON array of them, answered in order with `{"ok": true, "ids": [...]}` once
/// acknowledged at the connection's `ack` level, or `{"ok": false, "error": <problem>}`;
/// the connection stays open after a bad message.
#[utoipa::path(
    get,
    path = "/v1/streams/{stream}/ws",
    params(("stream" = String, Path, description = "Stream name"), PublishQuery),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol"),
        (status = 400, description = "Invalid parameters", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown stream", body = crate::error::Problem, content_type = "application/problem+json"),
        (status = 426, description = "Not a WebSocket handshake", body = crate::error::Problem, content_type = "application/problem+json"),
    )
)]
pub async fn upgrade(
    State(app): State<App>,
    Path(stream): Path<String>,
    query: Result<Query<PublishQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let stream = app.inner.streams.get(&stream)?.clone();
    let ack = crate::http::ack_of(&app, query)?;
    let ws = ws.map_err(|e| ApiError::NotWebSocket(e.body_text()))?;
    let limit = app.inner.max_body_bytes;
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| serve(app, stream, ack, socket)))
}

async fn serve(app: App, stream: Arc<Stream>, ack: Ack, mut socket: WebSocket) {
    let metrics = app.inner.metrics.clone();
    metrics.connection_opened("ws");
    let closing = app.inner.closing.clone();
    loop {
        let message = tokio::select! {
            () = closing.cancelled() => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::AWAY,
                        reason: "server shutting down".into(),
                    })))
                    .await;
                break;
            }
            m = socket.recv() => m,
        };
        let reply = match message {
            None => break,
            Some(Err(e)) => {
                // Over the size limit, or a protocol error: the socket cannot go on.
                tracing::debug!(error = %e, "websocket closed with an error");
                break;
            }
            Some(Ok(Message::Text(text))) => {
                let span = sluice_core::telemetry::recorded_span(
                    || tracing::info_span!("ws.message", otel.kind = "server", stream = %stream.settings.name),
                );
                answer(&app, &stream, ack, text.as_bytes())
                    .instrument(span)
                    .await
            }
            Some(Ok(Message::Binary(_))) => error_frame(&ApiError::InvalidField(
                "binary messages are not accepted; send events as text".to_owned(),
            )),
            Some(Ok(Message::Close(_))) => break,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        if socket
            .send(Message::Text(reply.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    metrics.connection_closed("ws");
}

/// The events of a text message (one object or an array of at most `max_events`), or the
/// error frame that answers it.
pub fn parse_message(text: &[u8], max_events: usize) -> Result<input::Payloads, Value> {
    input::parse(text, false, max_events).map_err(|e| error_frame(&e))
}

async fn answer(app: &App, stream: &Stream, ack: Ack, text: &[u8]) -> Value {
    let payloads = match parse_message(text, app.inner.max_batch_events) {
        Ok(p) => p,
        Err(frame) => return frame,
    };
    let result = async {
        if !app.kafka_ready() {
            return Err(ApiError::NotReady);
        }
        let published = app
            .inner
            .publisher
            .publish(
                stream,
                payloads.events,
                &Hints::default(),
                payloads.batch,
                ack,
            )
            .await?;
        Ok(published)
    }
    .await;
    match result {
        Ok(published) => {
            let mut reply = json!({
                "ok": true,
                "ids": published.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            });
            if matches!(ack, Ack::Sink(_)) {
                let pending: Vec<&str> = published
                    .iter()
                    .filter(|p| p.sink != Some(SinkState::Written))
                    .map(|p| p.id.as_str())
                    .collect();
                if pending.is_empty() {
                    reply["sink"] = json!("written");
                } else {
                    reply["sink"] = json!("pending");
                    reply["pending"] = json!(pending);
                }
            }
            reply
        }
        Err(e) => error_frame(&e),
    }
}

fn error_frame(e: &ApiError) -> Value {
    json!({"ok": false, "error": e.problem()})
}
