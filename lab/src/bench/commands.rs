//! The database server's own count of the commands it ran (`serverStatus`'s
//! `metrics.commands`), before and after a span: which commands a scenario cost it, per
//! 1,000 deliveries. Servers that do not keep the count give nothing.

use std::collections::BTreeMap;

use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};

/// Commands run so far, by name (`total` of each).
pub async fn counts(client: &mongodb::Client) -> BTreeMap<String, i64> {
    let Ok(status) = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await
    else {
        return BTreeMap::new();
    };
    let Ok(commands) = status
        .get_document("metrics")
        .and_then(|m| m.get_document("commands"))
    else {
        return BTreeMap::new();
    };
    commands
        .iter()
        .filter_map(|(name, v)| match v {
            Bson::Document(d) => Some((name.clone(), total(d)?)),
            _ => None,
        })
        .collect()
}

fn total(d: &Document) -> Option<i64> {
    match d.get("total")? {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(n) => Some(*n as i64),
        _ => None,
    }
}

/// The commands run between two counts, per 1,000 `units`, most frequent first (those
/// run at all), and their sum.
pub fn per_1000(
    before: &BTreeMap<String, i64>,
    after: &BTreeMap<String, i64>,
    units: usize,
) -> Value {
    let mut ran: Vec<(&String, f64)> = after
        .iter()
        .map(|(name, n)| {
            let d = n - before.get(name).copied().unwrap_or(0);
            (name, d as f64 / units.max(1) as f64 * 1000.0)
        })
        .filter(|(_, d)| *d > 0.0)
        .collect();
    ran.sort_by(|a, b| b.1.total_cmp(&a.1));
    let all: f64 = ran.iter().map(|(_, d)| d).sum();
    let named: Vec<Value> = ran
        .into_iter()
        .map(|(name, d)| json!([name, (d * 10.0).round() / 10.0]))
        .collect();
    json!({"all": (all * 10.0).round() / 10.0, "by_command": named})
}

/// One line: the sum, then each command.
pub fn line(per_1000: &Value) -> String {
    let each: Vec<String> = per_1000["by_command"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|c| format!("{} {}", c[0].as_str().unwrap_or("?"), c[1]))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "database commands per 1,000: {} ({})",
        per_1000["all"],
        each.join(", ")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_commands_that_ran_are_listed_most_frequent_first() {
        let before = [("find".to_owned(), 10), ("insert".to_owned(), 5)].into();
        let after = [
            ("find".to_owned(), 30),
            ("insert".to_owned(), 5),
            ("update".to_owned(), 40),
        ]
        .into();
        let v = super::per_1000(&before, &after, 2_000);
        assert_eq!(v["all"], 30.0);
        assert_eq!(
            v["by_command"],
            serde_json::json!([["update", 20.0], ["find", 10.0]])
        );
        assert_eq!(
            super::line(&v),
            "database commands per 1,000: 30.0 (update 20.0, find 10.0)"
        );
    }
}
