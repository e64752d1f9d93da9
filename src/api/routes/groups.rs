//! `PUT/GET/DELETE /v1/groups/{group_id}`: named audiences.

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{rfc3339, Time};
use crate::api::error::{ApiError, JsonBody};
use crate::domain::{FieldError, GroupId, UserId};
use crate::store::{GroupDoc, Store};

/// Members shown by `GET`; the full membership is streamed only for fan-out.
const SHOWN_MEMBERS: i64 = 1000;

/// A group's name and every member.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupBody {
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    name: String,
    #[schema(value_type = Vec<UserId>)]
    user_ids: Vec<String>,
}

/// A group, with up to 1,000 of its members.
#[derive(Debug, Serialize, ToSchema)]
pub struct Group {
    group_id: String,
    name: String,
    member_count: i64,
    user_ids: Vec<String>,
    created_at: Time,
    updated_at: Time,
}

fn group(g: &GroupDoc, members: Vec<String>) -> Group {
    Group {
        group_id: g.id.clone(),
        name: g.name.clone(),
        member_count: g.member_count,
        user_ids: members,
        created_at: rfc3339(g.created_at),
        updated_at: rfc3339(g.updated_at),
    }
}

pub async fn put_group(
    State(store): State<Store>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Response, ApiError> {
    let mut errors = Vec::new();
    if let Err(e) = GroupId::parse(&id) {
        errors.push(FieldError::new("group_id", e));
    }
    if body.name.trim().is_empty() || body.name.chars().count() > 200 {
        errors.push(FieldError::new("name", "must be 1-200 characters"));
    }
    let mut members = BTreeSet::new();
    for u in &body.user_ids {
        match UserId::parse(u) {
            Ok(u) => {
                members.insert(u.to_string());
            }
            Err(e) => errors.push(FieldError::new("user_ids", e)),
        }
    }
    if !errors.is_empty() {
        errors.truncate(20);
        return Err(ApiError::validation(errors));
    }
    let members: Vec<String> = members.into_iter().collect();
    let (group, created) = store.put_group(&id, body.name.trim(), &members).await?;
    let shown = members.into_iter().take(SHOWN_MEMBERS as usize).collect();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(self::group(&group, shown))).into_response())
}

pub async fn get_group(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<Json<Group>, ApiError> {
    let g = store
        .get_group(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("group", &id))?;
    let members = store.group_member_ids(&id, SHOWN_MEMBERS).await?;
    Ok(Json(group(&g, members)))
}

pub async fn delete_group(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store.delete_group(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("group", &id))
    }
}
