//! Demo data: users, a group and content records that the shipped templates use.

use mongodb::bson::doc;

use crate::store::{Store, UserDoc};

/// Writes the demo data (idempotent: re-running replaces it).
pub async fn seed(store: &Store) -> anyhow::Result<()> {
    let users = [
        UserDoc {
            id: "ada".into(),
            email: Some("ada@example.com".into()),
            first_name: Some("Ada".into()),
            last_name: Some("Lovelace".into()),
            locale: Some("en".into()),
            timezone: Some("Europe/London".into()),
            ..Default::default()
        },
        UserDoc {
            id: "joao".into(),
            email: Some("joao@example.com".into()),
            phone: Some("+5511912345678".into()),
            push_tokens: vec!["demo-device-token-joao".into()],
            first_name: Some("João".into()),
            last_name: Some("Silva".into()),
            locale: Some("pt-BR".into()),
            timezone: Some("America/Sao_Paulo".into()),
            ..Default::default()
        },
        UserDoc {
            id: "grace".into(),
            phone: Some("+15551234567".into()),
            first_name: Some("Grace".into()),
            last_name: Some("Hopper".into()),
            locale: Some("en-US".into()),
            timezone: Some("America/New_York".into()),
            ..Default::default()
        },
    ];
    let ids: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
    for u in users {
        store.put_user(u).await?;
    }
    store.put_group("demo", "Demo audience", &ids).await?;
    store
        .put_content(
            "m1",
            doc! {"title": "The Long Night", "show": "Northern Lights", "season": 2, "episode": 5},
        )
        .await?;
    store
        .put_content(
            "m2",
            doc! {"title": "Dawn", "show": "Northern Lights", "season": 2, "episode": 6},
        )
        .await?;
    tracing::info!(users = ids.len(), group = "demo", "demo data written");
    Ok(())
}
