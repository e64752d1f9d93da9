//! `/v1/templates`: list, store (overriding files), remove, and preview templates.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{IntoParams, ToSchema};

use crate::api::error::{ApiError, JsonBody, QueryParams};
use crate::app::TemplateSync;
use crate::config::Settings;
use crate::domain::{Channel, EventType, FieldError};
use crate::store::Store;
use crate::templates::{compile, valid_locale, Origin, PartSource, Rendered, Templates};

/// The body's field for each part of a channel.
fn fields(channel: Channel) -> &'static [(&'static str, &'static str)] {
    match channel {
        Channel::Email => &[
            ("subject", "email.subject"),
            ("html", "email.html"),
            ("text", "email.txt"),
        ],
        Channel::Sms => &[("text", "sms")],
        Channel::Push => &[
            ("title", "push.title"),
            ("body", "push.body"),
            ("data", "push.data"),
        ],
        Channel::Webhook => &[("body", "webhook")],
        Channel::InApp => &[
            ("title", "in_app.title"),
            ("body", "in_app.body"),
            ("url", "in_app.url"),
            ("data", "in_app.data"),
        ],
    }
}

fn parse_target(
    event_type: &str,
    channel: &str,
    locale: Option<&str>,
) -> Result<(EventType, Channel), ApiError> {
    let mut errors = Vec::new();
    let t = EventType::parse(event_type)
        .map_err(|e| errors.push(FieldError::new("event_type", e)))
        .ok();
    let c = channel
        .parse::<Channel>()
        .map_err(|e| errors.push(FieldError::new("channel", e)))
        .ok();
    if locale.is_some_and(|l| !valid_locale(l)) {
        errors.push(FieldError::new(
            "locale",
            "must be a language tag such as pt-BR",
        ));
    }
    match (t, c) {
        (Some(t), Some(c)) if errors.is_empty() => Ok((t, c)),
        _ => Err(ApiError::validation(errors)),
    }
}

/// The parts of one (event type, channel, locale) and where they come from.
type PartsOf = (Vec<&'static str>, crate::templates::Origin);

/// One channel's template for an event type (and locale).
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateEntry {
    event_type: String,
    channel: Channel,
    /// Null: the base template, used when no locale matches.
    locale: Option<String>,
    /// Its part files (`email.subject`, `sms`…).
    parts: Vec<&'static str>,
    origin: Origin,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateList {
    items: Vec<TemplateEntry>,
}

/// The source of one channel's parts, keyed by the fields `PUT` takes.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateSource {
    event_type: String,
    channel: Channel,
    locale: Option<String>,
    origin: Origin,
    parts: BTreeMap<String, String>,
}

/// A template to store: the parts of its channel (email: subject and html and/or text;
/// SMS: text; push: title and/or body, data; webhook: body; in-app: title and/or body,
/// url, data), each a Handlebars source.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct TemplateBody {
    /// Null or absent: the base template.
    #[schema(pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    locale: Option<String>,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    subject: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    html: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    text: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    title: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    body: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    data: String,
    #[serde(default)]
    #[schema(format = "handlebars", max_length = 262144)]
    url: String,
}

/// What `PUT` stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateStored {
    event_type: String,
    channel: Channel,
    locale: Option<String>,
    parts: Vec<&'static str>,
    origin: Origin,
}

pub async fn list(State(templates): State<Arc<Templates>>) -> Json<TemplateList> {
    let mut grouped: BTreeMap<(String, Channel, Option<String>), PartsOf> = BTreeMap::new();
    for p in templates.parts() {
        let entry = grouped
            .entry((p.event_type.clone(), p.channel(), p.locale.clone()))
            .or_insert((Vec::new(), p.origin));
        entry.0.push(p.part);
    }
    let items = grouped
        .into_iter()
        .map(
            |((event_type, channel, locale), (mut parts, origin))| TemplateEntry {
                event_type,
                channel,
                locale,
                parts: {
                    parts.sort_unstable();
                    parts
                },
                origin,
            },
        )
        .collect();
    Json(TemplateList { items })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LocaleQuery {
    /// One locale (default: the base template).
    #[param(pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    locale: Option<String>,
}

/// The source of one channel's parts (for one locale, or the base template), keyed by
/// the body fields `PUT` takes, so an editor can load, change and store them back.
pub async fn get(
    State(templates): State<Arc<Templates>>,
    Path((event_type, channel)): Path<(String, String)>,
    QueryParams(q): QueryParams<LocaleQuery>,
) -> Result<Json<TemplateSource>, ApiError> {
    let (event_type, channel) = parse_target(&event_type, &channel, q.locale.as_deref())?;
    let parts: Vec<_> = templates
        .parts()
        .into_iter()
        .filter(|p| {
            p.event_type == event_type.as_str() && p.channel() == channel && p.locale == q.locale
        })
        .collect();
    let Some(origin) = parts.first().map(|p| p.origin) else {
        return Err(ApiError::not_found(
            "template",
            &format!("{event_type}/{channel}"),
        ));
    };
    let mut sources = BTreeMap::new();
    for p in &parts {
        if let Some((field, _)) = fields(channel).iter().find(|(_, part)| *part == p.part) {
            sources.insert((*field).to_owned(), p.source.clone());
        }
    }
    Ok(Json(TemplateSource {
        event_type: event_type.to_string(),
        channel,
        locale: q.locale,
        origin,
        parts: sources,
    }))
}

/// Stores the parts of one channel (and locale): `{"locale", "subject", "html", "text"}`
/// for email, `{"text"}` for SMS, `{"title", "body"}` for push. A part that does not
/// compile is refused with its line and column.
pub async fn put(
    State(store): State<Store>,
    State(templates): State<Arc<Templates>>,
    State(sync): State<TemplateSync>,
    Path((event_type, channel)): Path<(String, String)>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<TemplateStored>), ApiError> {
    let locale = match body.get("locale") {
        None | Some(Value::Null) => None,
        Some(Value::String(l)) => Some(l.clone()),
        Some(_) => {
            return Err(ApiError::validation(vec![FieldError::new(
                "locale",
                "must be a string",
            )]))
        }
    };
    let (event_type, channel) = parse_target(&event_type, &channel, locale.as_deref())?;
    let body: Map<String, Value> = body.into_iter().filter(|(k, _)| k != "locale").collect();
    let parts = parse_parts(channel, &body)?;
    let names: Vec<&str> = parts.iter().map(|(p, _)| *p).collect();
    let existed = templates.parts().iter().any(|p| {
        p.event_type == event_type.as_str() && p.channel() == channel && p.locale == locale
    });
    let parts: Vec<(String, String)> = parts
        .into_iter()
        .map(|(p, source)| (p.to_owned(), source))
        .collect();
    store
        .put_templates(event_type.as_str(), channel, locale.as_deref(), &parts)
        .await?;
    sync.sync().await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(TemplateStored {
            event_type: event_type.to_string(),
            channel,
            locale,
            parts: names,
            origin: Origin::Api,
        }),
    ))
}

/// The parts of one channel from body fields (`subject`, `html`, `text` for email…), each
/// compiled with the bounds every template gets; refused with each field's problem (a
/// part that does not compile: `template_invalid`, with its line and column).
fn parse_parts(
    channel: Channel,
    body: &Map<String, Value>,
) -> Result<Vec<(&'static str, String)>, ApiError> {
    let allowed = fields(channel);
    let mut errors = Vec::new();
    let mut parts = Vec::new();
    let mut compile_failed = false;
    for (k, v) in body {
        let Some((_, part)) = allowed.iter().find(|(f, _)| f == k) else {
            let names: Vec<&str> = allowed.iter().map(|(f, _)| *f).collect();
            errors.push(FieldError::new(
                crate::domain::truncate(k, 32),
                format!("unknown field for {channel} (locale, {})", names.join(", ")),
            ));
            continue;
        };
        match v {
            Value::String(source) if source.len() <= 256 * 1024 => match compile(source) {
                Ok(_) => parts.push((*part, source.clone())),
                Err(e) => {
                    compile_failed = true;
                    errors.push(FieldError::new(k.clone(), e.to_string()));
                }
            },
            Value::String(_) => errors.push(FieldError::new(k.clone(), "is over 256 KiB")),
            _ => errors.push(FieldError::new(k.clone(), "must be a string")),
        }
    }
    let has = |p: &str| parts.iter().any(|(q, _)| *q == p);
    match channel {
        Channel::Email if !has("email.subject") => {
            errors.push(FieldError::new("subject", "is required"))
        }
        Channel::Email if !has("email.html") && !has("email.txt") => {
            errors.push(FieldError::new("html", "give html, text or both"))
        }
        Channel::Sms if !has("sms") => errors.push(FieldError::new("text", "is required")),
        Channel::Webhook if parts.is_empty() => errors.push(FieldError::new("body", "is required")),
        Channel::Push if parts.is_empty() => {
            errors.push(FieldError::new("title", "give title, body or both"))
        }
        Channel::InApp if !has("in_app.title") && !has("in_app.body") => {
            errors.push(FieldError::new("title", "give title, body or both"))
        }
        _ => {}
    }
    if !errors.is_empty() {
        let mut err = ApiError::validation(errors);
        if compile_failed {
            err.code = "template_invalid";
        }
        return Err(err);
    }
    Ok(parts)
}

/// Removes the stored parts; the files (if any) apply again.
pub async fn delete(
    State(store): State<Store>,
    State(sync): State<TemplateSync>,
    Path((event_type, channel)): Path<(String, String)>,
    QueryParams(q): QueryParams<LocaleQuery>,
) -> Result<StatusCode, ApiError> {
    let (event_type, channel) = parse_target(&event_type, &channel, q.locale.as_deref())?;
    let removed = store
        .delete_templates(event_type.as_str(), channel, q.locale.as_deref())
        .await?;
    if removed == 0 {
        return Err(ApiError::not_found(
            "stored template",
            &format!("{event_type}/{channel}"),
        ));
    }
    sync.sync().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What to render, and with which sample data.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewBody {
    #[schema(value_type = EventType)]
    event_type: String,
    #[schema(value_type = Channel)]
    channel: String,
    #[schema(pattern = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
    locale: Option<String>,
    /// The recipient's profile fields, as `user.*` in the template.
    #[serde(default)]
    user: Map<String, Value>,
    /// The event's payload, as `payload.*`.
    #[serde(default)]
    payload: Map<String, Value>,
    /// Enrichment results, as `content`.
    #[serde(default)]
    content: Vec<Value>,
    /// Unsaved parts (a `PUT` body; its `locale` is ignored for this one) to render
    /// instead of the stored template.
    #[schema(value_type = Option<TemplateBody>)]
    draft: Option<Map<String, Value>>,
}

/// A rendered preview.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    event_type: String,
    channel: Channel,
    locale: Option<String>,
    rendered: RenderedBody,
}

/// A rendered message: the parts of its channel (email: subject, html, text; SMS: text
/// and segments; push: title, body, data; webhook: body, a JSON document as text; in-app:
/// title, body, url, data).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct RenderedBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    /// GSM-7 or UCS-2 segments the SMS text takes.
    #[serde(skip_serializing_if = "Option::is_none")]
    segments: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    /// Push: every value a string; in-app: any JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    data: Option<Map<String, Value>>,
}

/// Renders with sample data exactly as a delivery would (same context, strict mode).
pub async fn preview(
    State(templates): State<Arc<Templates>>,
    State(settings): State<Arc<Settings>>,
    JsonBody(body): JsonBody<PreviewBody>,
) -> Result<Json<Preview>, ApiError> {
    let (event_type, channel) =
        parse_target(&body.event_type, &body.channel, body.locale.as_deref())?;
    let mut user = json!({
        "user_id": "preview", "email": null, "phone": null, "first_name": null, "last_name": null,
        "birthday_date": null, "locale": body.locale, "timezone": null,
    });
    for (k, v) in body.user {
        user[k] = v;
    }
    let context = json!({
        "user": user,
        "payload": body.payload,
        "content": body.content,
        "event_type": event_type,
        "notification_id": "preview",
        // A marketing delivery's links (null in transactional ones), as samples.
        "unsubscribe_url": format!("{}/u/preview", settings.server.public_url.trim_end_matches('/')),
        "unsubscribe_all_url": format!("{}/u/preview-all", settings.server.public_url.trim_end_matches('/')),
    });
    let draft = match &body.draft {
        None => None,
        Some(fields) => {
            // A draft is a `PUT` body; its locale is the preview's.
            let fields: Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| *k != "locale")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let parts = parse_parts(channel, &fields)?
                .into_iter()
                .map(|(part, source)| PartSource {
                    event_type: event_type.as_str().to_owned(),
                    part,
                    locale: body.locale.clone(),
                    source,
                    origin: Origin::Api,
                })
                .collect();
            Some(Templates::from_parts(parts).map_err(ApiError::internal)?)
        }
    };
    let rendered = draft
        .as_ref()
        .unwrap_or(&templates)
        .render(
            event_type.as_str(),
            channel,
            body.locale.as_deref(),
            &context,
        )
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.reason(), e.to_string()))?;
    Ok(Json(Preview {
        event_type: event_type.to_string(),
        channel,
        locale: body.locale,
        rendered: RenderedBody::from(rendered),
    }))
}

impl From<Rendered> for RenderedBody {
    fn from(rendered: Rendered) -> Self {
        match rendered {
            Rendered::Email {
                subject,
                html,
                text,
            } => RenderedBody {
                subject: Some(subject),
                html,
                text,
                ..Default::default()
            },
            Rendered::Sms { text } => RenderedBody {
                segments: Some(crate::templates::sms_segments(&text)),
                text: Some(text),
                ..Default::default()
            },
            Rendered::Push { title, body, data } => RenderedBody {
                title: Some(title),
                body: Some(body),
                data: Some(
                    data.into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                ),
                ..Default::default()
            },
            Rendered::InApp {
                title,
                body,
                url,
                data,
            } => RenderedBody {
                title: Some(title),
                body: Some(body),
                url,
                data,
                ..Default::default()
            },
            Rendered::Webhook { body } => RenderedBody {
                body: Some(body),
                ..Default::default()
            },
        }
    }
}
