//! `/v1/templates`: list, store (overriding files), remove, and preview templates.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::error::{ApiError, JsonBody};
use crate::app::Context;
use crate::domain::{Channel, EventType, FieldError};
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

pub async fn list(State(ctx): State<Context>) -> Json<Value> {
    let mut grouped: BTreeMap<(String, Channel, Option<String>), PartsOf> = BTreeMap::new();
    for p in ctx.templates.parts() {
        let entry = grouped
            .entry((p.event_type.clone(), p.channel(), p.locale.clone()))
            .or_insert((Vec::new(), p.origin));
        entry.0.push(p.part);
    }
    let items: Vec<Value> = grouped
        .into_iter()
        .map(|((event_type, channel, locale), (mut parts, origin))| {
            parts.sort_unstable();
            json!({"event_type": event_type, "channel": channel, "locale": locale, "parts": parts, "origin": origin})
        })
        .collect();
    Json(json!({"items": items}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocaleQuery {
    locale: Option<String>,
}

/// The source of one channel's parts (for one locale, or the base template), keyed by
/// the body fields `PUT` takes, so an editor can load, change and store them back.
pub async fn get(
    State(ctx): State<Context>,
    Path((event_type, channel)): Path<(String, String)>,
    Query(q): Query<LocaleQuery>,
) -> Result<Json<Value>, ApiError> {
    let (event_type, channel) = parse_target(&event_type, &channel, q.locale.as_deref())?;
    let parts: Vec<_> = ctx
        .templates
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
    let mut fields_json = Map::new();
    for p in &parts {
        if let Some((field, _)) = fields(channel).iter().find(|(_, part)| *part == p.part) {
            fields_json.insert((*field).to_owned(), json!(p.source));
        }
    }
    Ok(Json(json!({
        "event_type": event_type, "channel": channel, "locale": q.locale,
        "origin": origin, "parts": fields_json,
    })))
}

/// Stores the parts of one channel (and locale): `{"locale", "subject", "html", "text"}`
/// for email, `{"text"}` for SMS, `{"title", "body"}` for push. A part that does not
/// compile is refused with its line and column.
pub async fn put(
    State(ctx): State<Context>,
    Path((event_type, channel)): Path<(String, String)>,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let existed = ctx.templates.parts().iter().any(|p| {
        p.event_type == event_type.as_str() && p.channel() == channel && p.locale == locale
    });
    let parts: Vec<(String, String)> = parts
        .into_iter()
        .map(|(p, source)| (p.to_owned(), source))
        .collect();
    ctx.store
        .put_templates(event_type.as_str(), channel, locale.as_deref(), &parts)
        .await?;
    ctx.sync_templates().await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        Json(
            json!({"event_type": event_type, "channel": channel, "locale": locale, "parts": names, "origin": "api"}),
        ),
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
    State(ctx): State<Context>,
    Path((event_type, channel)): Path<(String, String)>,
    Query(q): Query<LocaleQuery>,
) -> Result<StatusCode, ApiError> {
    let (event_type, channel) = parse_target(&event_type, &channel, q.locale.as_deref())?;
    let removed = ctx
        .store
        .delete_templates(event_type.as_str(), channel, q.locale.as_deref())
        .await?;
    if removed == 0 {
        return Err(ApiError::not_found(
            "stored template",
            &format!("{event_type}/{channel}"),
        ));
    }
    ctx.sync_templates().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewBody {
    event_type: String,
    channel: String,
    locale: Option<String>,
    #[serde(default)]
    user: Map<String, Value>,
    #[serde(default)]
    payload: Map<String, Value>,
    #[serde(default)]
    content: Vec<Value>,
    /// Unsaved parts (the fields `PUT` takes) to render instead of the stored template.
    draft: Option<Map<String, Value>>,
}

/// Renders with sample data exactly as a delivery would (same context, strict mode).
pub async fn preview(
    State(ctx): State<Context>,
    JsonBody(body): JsonBody<PreviewBody>,
) -> Result<Json<Value>, ApiError> {
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
    });
    let draft = match &body.draft {
        None => None,
        Some(fields) => {
            let parts = parse_parts(channel, fields)?
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
        .unwrap_or(&ctx.templates)
        .render(
            event_type.as_str(),
            channel,
            body.locale.as_deref(),
            &context,
        )
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.reason(), e.to_string()))?;
    Ok(Json(
        json!({"event_type": event_type, "channel": channel, "locale": body.locale, "rendered": rendered_json(rendered)}),
    ))
}

/// A rendered message as the API shows it.
pub fn rendered_json(rendered: Rendered) -> Value {
    match rendered {
        Rendered::Email {
            subject,
            html,
            text,
        } => json!({"subject": subject, "html": html, "text": text}),
        Rendered::Sms { text } => {
            json!({"text": text, "segments": crate::templates::sms_segments(&text)})
        }
        Rendered::Push { title, body, data } => json!({"title": title, "body": body, "data": data}),
        Rendered::Webhook { body } => json!({"body": body}),
    }
}
