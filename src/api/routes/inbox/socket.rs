//! `GET /v1/inbox/ws`: a user's live inbox — new items and count changes, pings, and a resume that sends what a dropped socket missed exactly once.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use super::hub::{Hub, Subscription};
use super::session::{InboxUser, Sessions};
use super::{Counts, Item};
use crate::api::error::{ApiError, QueryParams};
use crate::config::Settings;
use crate::store::inbox::InboxCounts;
use crate::store::Store;

/// A resume reads at most this many missed items per query.
const CATCH_UP_PAGE: i64 = 100;
/// A socket whose peer does not take a message within this long is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code: the session token lapsed (start a new session and reconnect).
pub const CLOSE_SESSION_EXPIRED: u16 = 4001;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SocketQuery {
    /// The session token (browsers cannot set headers on a socket).
    #[param(min_length = 1)]
    token: String,
    /// The id of the last item this client saw: what arrived after it is sent first. An
    /// id herald no longer has (removed by retention) resumes from now.
    #[param(min_length = 1)]
    after: Option<String>,
    /// The `seq` of the last item this client saw (or a page's `latest_seq`); wins over
    /// `after`.
    #[param(minimum = 0)]
    after_seq: Option<i64>,
}

/// Stops every socket of this process at shutdown, and lets the server wait for them.
#[derive(Clone)]
pub struct SocketShutdown {
    pub cancel: CancellationToken,
    pub sockets: tokio_util::task::TaskTracker,
}

/// True when a browser page of `origin` may open the socket: the API's own origin (same
/// host) or one of `inbox.allowed_origins`. No `Origin` header: not a browser.
pub fn origin_allowed(settings: &Settings, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    if settings.inbox.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = url::Url::parse(origin).ok().and_then(|u| {
        let host = u.host_str()?.to_owned();
        Some(match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host,
        })
    });
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(&o))
}

/// `GET /v1/inbox/ws?token=…&after=…`.
#[allow(clippy::too_many_arguments)]
pub async fn socket(
    State(store): State<Store>,
    State(settings): State<Arc<Settings>>,
    Extension(hub): Extension<Hub>,
    Extension(sessions): Extension<Arc<Sessions>>,
    Extension(shutdown): Extension<SocketShutdown>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<SocketQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !origin_allowed(&settings, &headers) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this page's origin is not in inbox.allowed_origins",
        )
        .into_response();
    }
    if q.after_seq.is_some_and(|n| n < 0) {
        return ApiError::validation(vec![crate::domain::FieldError::new(
            "after_seq",
            "must be 0 or more",
        )])
        .into_response();
    }
    let user = match sessions.authorize(&q.token) {
        Ok(user) => user,
        Err(refused) => return refused.into_response(),
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            return ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                format!("open this URL as a WebSocket: {e}"),
            )
            .into_response()
        }
    };
    let ping = Duration::from_secs(settings.inbox.ping_secs);
    // Small buffers: an inbox socket carries little, and a process holds thousands.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(64 * 1024)
        .on_upgrade(move |ws| {
            shutdown.sockets.track_future(async move {
                let live = Live {
                    store,
                    sub: hub.subscribe(&user.user_id),
                    user,
                    ping,
                    last_seq: 0,
                    sent_counts: None,
                    cancel: shutdown.cancel,
                };
                if let Err(e) = live.run(ws, q.after_seq, q.after).await {
                    tracing::debug!(error = format!("{e:#}"), "inbox socket ended");
                }
            })
        })
}

/// One open socket.
struct Live {
    store: Store,
    sub: Subscription,
    user: InboxUser,
    ping: Duration,
    /// The number of the last item sent (or, at the start, already seen).
    last_seq: i64,
    sent_counts: Option<InboxCounts>,
    cancel: CancellationToken,
}

impl Live {
    async fn run(
        mut self,
        mut ws: WebSocket,
        after_seq: Option<i64>,
        after: Option<String>,
    ) -> anyhow::Result<()> {
        // Subscribed before reading, and the stream's epoch taken now: whatever is
        // written, or a stream reopened, from here on is seen below.
        let mut epoch = self.sub.rx().borrow_and_update().epoch;
        let known = match (after_seq, after) {
            (Some(seq), _) => Some(seq),
            (None, Some(id)) => self
                .store
                .inbox_item(&self.user.user_id, &id)
                .await?
                .map(|i| i.seq),
            (None, None) => None,
        };
        // A number past the newest item would leave the socket waiting for numbers that
        // were never given: it resumes from the newest instead.
        let latest = self.store.inbox_latest_seq(&self.user.user_id).await?;
        self.last_seq = known.map_or(latest, |seq| seq.min(latest));
        self.catch_up(&mut ws).await?;
        self.send_counts(&mut ws).await?;
        // A token is good through its `exp` second (as the routes check it): the socket
        // closes when the routes would refuse it.
        let left_ms = (self.user.expires_at + 1)
            .saturating_mul(1000)
            .saturating_sub(chrono::Utc::now().timestamp_millis())
            .max(0);
        let expires = Instant::now() + Duration::from_millis(left_ms as u64);
        let mut pings = tokio::time::interval_at(Instant::now() + self.ping, self.ping);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    return close(&mut ws, 1001, "server going away").await;
                }
                _ = tokio::time::sleep_until(expires) => {
                    return close(&mut ws, CLOSE_SESSION_EXPIRED, "session expired").await;
                }
                _ = pings.tick() => {
                    if heard.elapsed() > self.ping * 3 {
                        return close(&mut ws, 1001, "no answer to pings").await;
                    }
                    send(&mut ws, Message::Ping(Default::default())).await?;
                }
                incoming = ws.recv() => match incoming {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Ok(_)) => heard = Instant::now(),
                },
                changed = self.sub.rx().changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let signal = self.sub.rx().borrow_and_update().clone();
                    let next = signal
                        .latest
                        .as_ref()
                        .filter(|l| l.seq == self.last_seq.saturating_add(1));
                    if let Some(item) = next {
                        let item = Item::from((**item).clone());
                        self.last_seq += 1;
                        send_json(&mut ws, &json!({"type": "notification_received", "item": item})).await?;
                    } else if signal.epoch != epoch
                        || signal.latest.as_ref().is_some_and(|l| l.seq > self.last_seq)
                    {
                        self.catch_up(&mut ws).await?;
                    }
                    epoch = signal.epoch;
                    self.send_counts(&mut ws).await?;
                }
            }
        }
    }

    /// Sends, oldest first, every item after the last one sent (archived ones, from
    /// another tab or device, are passed over).
    async fn catch_up(&mut self, ws: &mut WebSocket) -> anyhow::Result<()> {
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            let missed = self
                .store
                .inbox_items_after(&self.user.user_id, self.last_seq, CATCH_UP_PAGE)
                .await?;
            let full = missed.len() as i64 == CATCH_UP_PAGE;
            for item in missed {
                self.last_seq = item.seq;
                if item.archived_at.is_some() {
                    continue;
                }
                let item = Item::from(item);
                send_json(ws, &json!({"type": "notification_received", "item": item})).await?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Sends the counts when they differ from the last sent.
    async fn send_counts(&mut self, ws: &mut WebSocket) -> anyhow::Result<()> {
        let counts = self.store.inbox_counts(&self.user.user_id).await?;
        if self.sent_counts == Some(counts) {
            return Ok(());
        }
        self.sent_counts = Some(counts);
        let c = Counts::from(counts);
        send_json(
            ws,
            &json!({"type": "counts_changed", "unread": c.unread, "unseen": c.unseen, "total": c.total}),
        )
        .await
    }
}

async fn send(ws: &mut WebSocket, m: Message) -> anyhow::Result<()> {
    tokio::time::timeout(SEND_TIMEOUT, ws.send(m))
        .await
        .map_err(|_| anyhow::anyhow!("the peer took no message for {SEND_TIMEOUT:?}"))??;
    Ok(())
}

async fn send_json(ws: &mut WebSocket, v: &serde_json::Value) -> anyhow::Result<()> {
    send(ws, Message::Text(v.to_string().into())).await
}

async fn close(ws: &mut WebSocket, code: u16, reason: &'static str) -> anyhow::Result<()> {
    send(
        ws,
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })),
    )
    .await
}
