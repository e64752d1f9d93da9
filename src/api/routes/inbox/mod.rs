//! The end user's inbox API (session tokens, not API keys): items, counts, marks, preferences and the live socket.

pub mod hub;
pub mod session;
mod socket;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::domain::preferences::Preferences;
use crate::domain::{EventType, FieldError, UserId};
use crate::store::inbox::{InboxCounts, InboxItemDoc, InboxQuery, ItemAction, MarkAll, ReadFilter};
use crate::store::Store;
pub use session::{InboxUser, Sessions};
pub use socket::{socket, SocketQuery, SocketShutdown};

/// Most items one page holds.
pub const PAGE_MAX: i64 = 100;

/// Who is asking: their id and the hash the customer's server computed for it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = InboxSessionBody)]
pub struct SessionBody {
    #[schema(value_type = UserId)]
    user_id: String,
    /// `hex(HMAC-SHA256(inbox.secret, user_id))`.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    user_hash: String,
}

/// A session: send the token as `Authorization: Bearer <token>` (and as `?token=` to
/// the socket) until it expires.
#[derive(Serialize, ToSchema)]
#[schema(as = InboxSession)]
pub struct Session {
    token: String,
    expires_at: Time,
    unread_count: i64,
    unseen_count: i64,
}

/// One inbox item.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = InboxItem)]
pub struct Item {
    id: String,
    /// The item's number among its user's items (in the order they arrived); a socket
    /// resumes after it (`after_seq`).
    seq: i64,
    delivery_id: String,
    notification_id: String,
    event_type: String,
    title: String,
    body: String,
    /// Where the item leads (http or https).
    url: Option<String>,
    /// What `in_app.data` rendered, for the customer's own front end.
    #[schema(value_type = Option<Object>)]
    data: Option<Value>,
    created_at: Time,
    seen_at: Option<Time>,
    read_at: Option<Time>,
    archived_at: Option<Time>,
}

impl From<InboxItemDoc> for Item {
    fn from(i: InboxItemDoc) -> Self {
        Self {
            id: i.id,
            seq: i.seq,
            delivery_id: i.delivery_id,
            notification_id: i.notification_id,
            event_type: i.event_type,
            title: i.title,
            body: i.body,
            url: i.url,
            data: i
                .data
                .map(|d| mongodb::bson::Bson::Document(d).into_relaxed_extjson()),
            created_at: rfc3339(i.created_at),
            seen_at: i.seen_at.map(rfc3339),
            read_at: i.read_at.map(rfc3339),
            archived_at: i.archived_at.map(rfc3339),
        }
    }
}

/// What `POST /v1/inbox/notifications/{id}/{action}` does.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = InboxItemActionName)]
pub enum ItemActionName {
    Read,
    Unread,
    Archive,
    Unarchive,
}

/// Items by read state.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = InboxReadState)]
pub enum ReadState {
    Unread,
    Read,
    #[default]
    All,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Which items by read state (default all).
    #[param(value_type = Option<ReadState>, inline)]
    status: Option<ReadState>,
    /// Archived items instead of the others (default false).
    archived: Option<bool>,
    /// Page size (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[1-9][0-9]{0,17}$")]
    cursor: Option<String>,
}

/// A page of items, newest first, with the user's counts.
#[derive(Serialize, ToSchema)]
#[schema(as = InboxItemPage)]
pub struct ItemPage {
    items: Vec<Item>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
    unread_count: i64,
    unseen_count: i64,
    /// The number of the user's newest item, listed or not (archived): open the socket
    /// with `after_seq` set to it to miss nothing after this page.
    latest_seq: i64,
}

/// The user's counts over items not archived: exactly what the items say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = InboxCounts)]
pub struct Counts {
    unread: i64,
    unseen: i64,
    total: i64,
}

impl From<InboxCounts> for Counts {
    fn from(c: InboxCounts) -> Self {
        Self {
            unread: c.unread,
            unseen: c.unseen,
            total: c.total,
        }
    }
}

/// What a bulk mark changed, and the counts after it.
#[derive(Serialize, ToSchema)]
#[schema(as = InboxMarked)]
pub struct Marked {
    changed: u64,
    unread: i64,
    unseen: i64,
    total: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadAllQuery {
    /// Only items of this event type.
    #[param(value_type = Option<EventType>)]
    event_type: Option<String>,
}

/// Who may see what: the user's own preferences, as the worker applies them.
pub type PreferencesBody = super::users::Preferences;

/// `POST /v1/inbox/session`.
pub async fn start_session(
    State(store): State<Store>,
    Extension(sessions): Extension<Arc<Sessions>>,
    JsonBody(body): JsonBody<SessionBody>,
) -> Result<Json<Session>, ApiError> {
    let user = UserId::parse(&body.user_id)
        .map_err(|e| ApiError::validation(vec![FieldError::new("user_id", e)]))?;
    if !sessions.hash_matches(user.as_str(), &body.user_hash) {
        return Err(session::unauthorized(
            "invalid_user_hash",
            "user_hash is not hex(HMAC-SHA256(inbox secret, user_id)) for this user",
        ));
    }
    let (token, expires_at) = sessions.issue(user.as_str()).map_err(ApiError::internal)?;
    let counts = store.inbox_counts(user.as_str()).await?;
    let expires_at = mongodb::bson::DateTime::from_millis(expires_at.saturating_mul(1000));
    Ok(Json(Session {
        token,
        expires_at: rfc3339(expires_at),
        unread_count: counts.unread,
        unseen_count: counts.unseen,
    }))
}

fn cursor_of(raw: Option<&str>) -> Result<Option<i64>, ApiError> {
    raw.map(|c| {
        c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::validation(vec![FieldError::new(
                "cursor",
                "is not a cursor this API gave out",
            )])
        })
    })
    .transpose()
}

/// `GET /v1/inbox/notifications`.
pub async fn list(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<ItemPage>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::validation(vec![FieldError::new(
            "limit",
            format!("must be between 1 and {PAGE_MAX}"),
        )]));
    }
    let query = InboxQuery {
        read: match q.status.unwrap_or_default() {
            ReadState::Unread => ReadFilter::Unread,
            ReadState::Read => ReadFilter::Read,
            ReadState::All => ReadFilter::All,
        },
        archived: q.archived.unwrap_or(false),
        limit,
        before: cursor_of(q.cursor.as_deref())?,
    };
    // The newest number first: an item committed meanwhile is then listed too (a
    // client drops it by id), never promised by `latest_seq` and left out of the page.
    let latest_seq = store.inbox_latest_seq(&user.user_id).await?;
    let (mut items, counts) = tokio::try_join!(
        store.inbox_items(&user.user_id, &query),
        store.inbox_counts(&user.user_id)
    )?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|i| i.seq.to_string())
    } else {
        None
    };
    Ok(Json(ItemPage {
        items: items.into_iter().map(Item::from).collect(),
        next_cursor,
        unread_count: counts.unread,
        unseen_count: counts.unseen,
        latest_seq,
    }))
}

/// `GET /v1/inbox/counts`.
pub async fn counts(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
) -> Result<Json<Counts>, ApiError> {
    Ok(Json(store.inbox_counts(&user.user_id).await?.into()))
}

/// `POST /v1/inbox/notifications/{id}/{action}`: read, unread, archive or unarchive.
pub async fn act(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Item>, ApiError> {
    let action = match action.as_str() {
        "read" => ItemAction::Read,
        "unread" => ItemAction::Unread,
        "archive" => ItemAction::Archive,
        "unarchive" => ItemAction::Unarchive,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route",
            ))
        }
    };
    // Another user's item is as absent as one that never was: ids do not leak.
    store
        .inbox_act(&user.user_id, &id, action)
        .await?
        .map(|i| Json(Item::from(i)))
        .ok_or_else(|| ApiError::not_found("inbox item", &id))
}

async fn marked(store: &Store, user: &InboxUser, mark: MarkAll) -> Result<Json<Marked>, ApiError> {
    let changed = store.inbox_mark_all(&user.user_id, &mark).await?;
    let c = store.inbox_counts(&user.user_id).await?;
    Ok(Json(Marked {
        changed,
        unread: c.unread,
        unseen: c.unseen,
        total: c.total,
    }))
}

/// `POST /v1/inbox/seen`: everything up to now.
pub async fn seen_all(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
) -> Result<Json<Marked>, ApiError> {
    marked(&store, &user, MarkAll::Seen).await
}

/// `POST /v1/inbox/read`: everything (of one event type) read.
pub async fn read_all(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
    QueryParams(q): QueryParams<ReadAllQuery>,
) -> Result<Json<Marked>, ApiError> {
    let event_type = q
        .event_type
        .map(|t| {
            EventType::parse(&t)
                .map(|t| t.as_str().to_owned())
                .map_err(|e| ApiError::validation(vec![FieldError::new("event_type", e)]))
        })
        .transpose()?;
    marked(&store, &user, MarkAll::Read { event_type }).await
}

/// `GET /v1/inbox/preferences`: the stored preferences (empty when herald has no
/// profile of the user).
pub async fn get_preferences(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
) -> Result<Json<Value>, ApiError> {
    let stored = store.get_user(&user.user_id).await?;
    Ok(Json(stored.map_or_else(
        || Value::Object(Map::new()),
        |u| mongodb::bson::Bson::Document(u.preferences).into_relaxed_extjson(),
    )))
}

/// `PUT /v1/inbox/preferences`: replaces them. Only for a user herald has a profile of
/// (a profile made here would hide the enrichment service's).
pub async fn put_preferences(
    State(store): State<Store>,
    Extension(user): Extension<InboxUser>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    Preferences::parse(&Value::Object(body.clone())).map_err(ApiError::validation)?;
    let doc =
        crate::store::storable_document("preferences", &body).map_err(ApiError::validation)?;
    if !store.set_preferences(&user.user_id, doc).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "user_not_found",
            "herald has no profile of this user to keep preferences on",
        ));
    }
    Ok(Json(Value::Object(body)))
}

/// CORS for the inbox routes: the origins of `inbox.allowed_origins` may call them from
/// a browser with a session token (never with cookies). Other routes get no CORS headers.
pub fn cors(settings: &crate::config::InboxSettings) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allowed: Vec<HeaderValue> = settings
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            parts.uri.path().starts_with("/v1/inbox/") && allowed.contains(origin)
        }))
        .allow_methods([Method::GET, Method::POST, Method::PUT])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(std::time::Duration::from_secs(600))
}

/// The widget's script, embedded in the binary.
const WIDGET: &str = include_str!("widget.js");
const DEMO: &str = include_str!("demo.html");

/// `GET /inbox.js`.
pub async fn widget() -> impl axum::response::IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "public, max-age=300"),
        ],
        WIDGET,
    )
}

/// `GET /inbox/demo` (development only): the widget for the demo user, whose hash this
/// page computes on the server as a customer's own server would.
pub async fn demo(
    State(settings): State<Arc<crate::config::Settings>>,
    Extension(sessions): Extension<Arc<Sessions>>,
) -> axum::response::Html<String> {
    let user = &settings.inbox.demo_user;
    let config = serde_json::json!({"userId": user, "userHash": sessions.user_hash(user)});
    // Inside <script>: `<` escaped so no value can close the element.
    let config = config.to_string().replace('<', "\\u003c");
    axum::response::Html(DEMO.replace("{{CONFIG}}", &config))
}
