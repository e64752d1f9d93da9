//! `POST /v1/events`: validate, de-duplicate, and durably accept before answering.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{OneOfBuilder, Type};
use utoipa::openapi::{ObjectBuilder, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use super::{Time, Zone};
use crate::api::error::{read_body, ApiError, BodyLimit};
use crate::domain::event::{parse_event, EventError};
use crate::domain::{Category, Channel, EventType, Priority, UserId};
use crate::ingest::{AcceptError, AcceptedAs, Intake};
use crate::store::Accepted as Stored;

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        let status = match e {
            EventError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            EventError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            EventError::Invalid(_) | EventError::NoRecipients => StatusCode::UNPROCESSABLE_ENTITY,
        };
        match e {
            EventError::Invalid(details) => ApiError::validation(details),
            other => ApiError::new(status, other.code(), other.message()),
        }
    }
}

impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::UnknownGroup(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), e.to_string())
            }
            AcceptError::Invalid(details) => ApiError::validation(details),
            AcceptError::Schedule(e) => ApiError::from(e),
            AcceptError::Store(cause) => ApiError::from(cause),
        }
    }
}

// The request bodies below document what `parse_event` (and, for schedules,
// `parse_schedule`) accept: those parse by hand to report every bad field at once, so
// these types are never built; the API test runs schemathesis against the document to
// hold the two together.

/// An event (`POST /v1/events`). Recipients come from `recipients`, from the seed
/// format's `payload.user`, or both; at least one recipient is required.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct EventBody {
    /// A repeat of an id answers the original notification (200) instead of a new one.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    event_id: Option<String>,
    event_type: EventType,
    priority: Option<PriorityIn>,
    recipients: Option<RecipientsBody>,
    /// Every channel with a template when absent.
    #[schema(min_items = 1)]
    channels: Option<Vec<Channel>>,
    payload: Option<Payload>,
    /// Deliver at this time instead of now (not with `schedule`).
    send_at: Option<Time>,
    /// The seed format's recurring form: a cron expression makes this a campaign.
    #[schema(format = "cron")]
    schedule: Option<String>,
    /// The IANA zone `schedule` fires in (default UTC).
    #[schema(value_type = Option<Zone>)]
    timezone: Option<String>,
    /// When `schedule` starts firing.
    start_dt: Option<Time>,
    /// When the upstream system created the event (kept for the log).
    created_dt: Option<Time>,
    /// Overrides the event type's configured category.
    category: Option<Category>,
}

/// A priority lane by name, or the seed format's 1 (high), 2 (normal), 3 (low).
#[derive(Deserialize)]
pub struct PriorityIn(#[allow(dead_code)] Value);

impl utoipa::PartialSchema for PriorityIn {
    fn schema() -> RefOr<Schema> {
        let number = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .enum_values(Some([1, 2, 3]));
        OneOfBuilder::new()
            .item(Priority::schema())
            .item(number)
            .into()
    }
}
impl ToSchema for PriorityIn {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((Priority::name().into_owned(), Priority::schema()));
    }
}

/// A user id, or (the seed format's) an integer standing for its digits.
#[derive(Deserialize)]
pub struct RecipientId(#[allow(dead_code)] Value);

impl utoipa::PartialSchema for RecipientId {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(UserId::schema())
            .item(ObjectBuilder::new().schema_type(Type::Integer))
            .into()
    }
}
impl ToSchema for RecipientId {}

/// Who receives a notification: any of user ids, a group and a segment.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct RecipientsBody {
    #[serde(default)]
    user_ids: Vec<RecipientId>,
    /// An existing group (`PUT /v1/groups/{id}`).
    group_id: Option<UserId>,
    segment: Option<Segment>,
}

/// Every user (`all: true`), or those with a locale and/or a tag.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
#[allow(dead_code)]
pub struct Segment {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    #[schema(min_length = 1, max_length = 35)]
    locale: String,
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64)]
    tag: String,
}

/// The template's data; two fields mean something to herald.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct Payload {
    /// The seed format's recipients.
    #[serde(default)]
    user: Vec<RecipientId>,
    /// Content ids for enrichment.
    #[serde(default)]
    content: Vec<ContentId>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A content id: a string or an integer.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
pub enum ContentId {
    Text(String),
    Number(i64),
}

/// The answer to an accepted event.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    notification_id: String,
    event_id: String,
    /// Always `accepted`: the deliveries are recorded and will be sent.
    status: &'static str,
}

/// The answer to an event that carried a `schedule`: the campaign it made.
#[derive(Serialize, ToSchema)]
pub struct ScheduleMade {
    schedule_id: String,
    next_fire_at: Option<Time>,
}

/// How long a client refused for overload is asked to wait.
const OVERLOAD_RETRY_SECS: u64 = 2;

pub async fn post_event(
    State(intake): State<Intake>,
    Extension(limit): Extension<BodyLimit>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                "Idempotency-Key must be printable ASCII",
            )
        })?),
    };
    let key = key.map(str::to_owned);
    let body = read_body(req, limit.0).await?;
    let event = parse_event(&body, key.as_deref(), intake.limits())?;
    if let Err((waiting, bound)) = intake.admit().await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{waiting} deliveries are waiting (the bound is {bound}); nothing was written, retry after the given seconds"
            ),
        )
        .retry_after(OVERLOAD_RETRY_SECS));
    }
    let (status, n) = match intake.accept_event(event, "api").await? {
        AcceptedAs::Notification(Stored::New(n)) => (StatusCode::ACCEPTED, n),
        AcceptedAs::Notification(Stored::Duplicate(n)) => (StatusCode::OK, n),
        AcceptedAs::Schedule { schedule, created } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let made = ScheduleMade {
                schedule_id: schedule.id,
                next_fire_at: schedule.next_fire_at.map(super::rfc3339),
            };
            return Ok((status, Json(made)).into_response());
        }
    };
    let accepted = Accepted {
        notification_id: n.id,
        event_id: n.event_id,
        status: "accepted",
    };
    Ok((status, Json(accepted)).into_response())
}
