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
use crate::templates::{compile, valid_locale, Rendered};

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
    let allowed = fields(channel);
    let mut errors = Vec::new();
    let mut parts = Vec::new();
    let mut compile_failed = false;
    for (k, v) in &body {
        if k == "locale" {
            continue;
        }
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
                Ok(_) => parts.push(((*part).to_owned(), source.clone())),
                Err(e) => {
                    compile_failed = true;
                    errors.push(FieldError::new(k.clone(), e.to_string()));
                }
            },
            Value::String(_) => errors.push(FieldError::new(k.clone(), "is over 256 KiB")),
            _ => errors.push(FieldError::new(k.clone(), "must be a string")),
        }
    }
    let has = |p: &str| parts.iter().any(|(q, _)| q == p);
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
    let existed = ctx.templates.parts().iter().any(|p| {
        p.event_type == event_type.as_str() && p.channel() == channel && p.locale == locale
    });
    ctx.store
        .put_templates(event_type.as_str(), channel, locale.as_deref(), &parts)
        .await?;
    ctx.sync_templates().await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let names: Vec<&String> = parts.iter().map(|(p, _)| p).collect();
    Ok((
        status,
        Json(
            json!({"event_type": event_type, "channel": channel, "locale": locale, "parts": names, "origin": "api"}),
        ),
    ))
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
    let rendered = ctx
        .templates
        .render(
            event_type.as_str(),
            channel,
            body.locale.as_deref(),
            &context,
        )
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.reason(), e.to_string()))?;
    let out = match rendered {
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
    };
    Ok(Json(
        json!({"event_type": event_type, "channel": channel, "locale": body.locale, "rendered": out}),
    ))
}
