//! Delivery statistics: hourly rollups moved in the same transactions as the deliveries
//! they count, read back with aggregation pipelines (fast however many deliveries exist).

use std::collections::BTreeMap;

use anyhow::Context as _;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::{UpdateOneModel, WriteModel};
use mongodb::{ClientSession, Collection, Database, IndexModel, Namespace};

use super::{DeliveryDoc, Store};
use crate::domain::{DeliveryStatus, Priority};

pub(crate) const DELIVERY_STATS: &str = "delivery_stats";
/// Accept-to-sent histograms per (hour, channel): few documents, so percentiles over a
/// month read a few thousand small documents, not every count cell.
pub(crate) const DELIVERY_LATENCY: &str = "delivery_latency";

const HOUR_MS: i64 = 3_600_000;
/// Latency histogram buckets grow by 5%, so a percentile read from them is within 5%.
const BUCKET_GROWTH: f64 = 1.05;

/// The histogram bucket a latency falls in.
pub fn latency_bucket(ms: i64) -> u32 {
    ((ms.max(0) as f64 + 1.0).ln() / BUCKET_GROWTH.ln()).ceil() as u32
}

/// The largest latency (ms) a bucket holds: what a percentile in it is reported as.
pub fn bucket_upper_ms(bucket: u32) -> i64 {
    (BUCKET_GROWTH.powi(bucket as i32) - 1.0).round() as i64
}

/// One rollup document: deliveries created in one hour, of one channel, event type,
/// provider and status.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct StatKey {
    hour_ms: i64,
    channel: &'static str,
    event_type: String,
    provider: String,
    status: &'static str,
}

/// What a recipient did with a delivery, counted in the rollups beside the statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    Complained,
    Unsubscribed,
}

impl Mark {
    pub(crate) const ALL: [&'static str; 2] = ["complained", "unsubscribed"];

    fn as_str(self) -> &'static str {
        match self {
            Self::Complained => "complained",
            Self::Unsubscribed => "unsubscribed",
        }
    }
}

/// Counter moves of one transaction, merged per rollup document before writing.
#[derive(Debug, Default)]
pub(crate) struct StatMoves {
    /// Appended to each rollup document's id: writers that run concurrently all the time
    /// (fan-out and outcome commits) keep their own documents, so their transactions do
    /// not conflict on them; readers sum over all of them.
    shard: String,
    counts: BTreeMap<StatKey, i64>,
    /// (hour, channel) -> bucket -> count
    latency: BTreeMap<(i64, &'static str), BTreeMap<u32, i64>>,
}

impl StatMoves {
    /// Moves kept on rollup documents of their own: those of `writer` (`fanout`,
    /// `commit`) for deliveries of `lane`.
    pub(crate) fn sharded(writer: &str, lane: Priority) -> Self {
        Self {
            shard: format!("|{writer}-{}", lane.as_str()),
            ..Self::default()
        }
    }

    /// Counts `delta` deliveries like `d` under `status` and `provider`; a `sent` one may
    /// bring its accept-to-sent latency.
    pub(crate) fn add(
        &mut self,
        d: &DeliveryDoc,
        status: DeliveryStatus,
        provider: Option<&str>,
        delta: i64,
        latency_ms: Option<i64>,
    ) {
        // `sending` stays counted under the status it was claimed from.
        let Some(status) = status.counter() else {
            return;
        };
        self.count(d, status, provider, delta);
        if let Some(ms) = latency_ms {
            let created = d.created_at.timestamp_millis();
            let hour_ms = created - created.rem_euclid(HOUR_MS);
            *self
                .latency
                .entry((hour_ms, d.channel.as_str()))
                .or_default()
                .entry(latency_bucket(ms))
                .or_default() += delta;
        }
    }

    /// Counts `delta` deliveries like `d` that the recipient acted on (`complained`,
    /// `unsubscribed`): marks beside its status, not statuses.
    pub(crate) fn mark(&mut self, d: &DeliveryDoc, mark: Mark, provider: Option<&str>, delta: i64) {
        self.count(d, mark.as_str(), provider, delta);
    }

    fn count(&mut self, d: &DeliveryDoc, status: &'static str, provider: Option<&str>, delta: i64) {
        let created = d.created_at.timestamp_millis();
        let hour_ms = created - created.rem_euclid(HOUR_MS);
        let key = StatKey {
            hour_ms,
            channel: d.channel.as_str(),
            event_type: d.event_type.clone(),
            provider: provider.unwrap_or_default().to_owned(),
            status,
        };
        *self.counts.entry(key).or_default() += delta;
    }

    /// Writes every non-zero move (one upsert per rollup document) inside `session`'s
    /// transaction, all in one round trip; a new rollup is kept `retention_days` past its
    /// hour.
    pub(crate) async fn write(
        self,
        db: &Database,
        session: &mut ClientSession,
        retention_days: u32,
    ) -> mongodb::error::Result<()> {
        let models = self.models(db, retention_days);
        if models.is_empty() {
            return Ok(());
        }
        db.client()
            .bulk_write(models)
            .session(&mut *session)
            .await?;
        Ok(())
    }

    /// The upserts of every non-zero move: counts, then latency histograms.
    fn models(self, db: &Database, retention_days: u32) -> Vec<WriteModel> {
        let expiry = |hour: DateTime| {
            crate::config::expiry(retention_days, super::chrono_time(hour)).map(super::bson_time)
        };
        let upsert = |namespace: &Namespace, filter: Document, update: Document| {
            WriteModel::UpdateOne(
                UpdateOneModel::builder()
                    .namespace(namespace.clone())
                    .filter(filter)
                    .update(update)
                    .upsert(true)
                    .build(),
            )
        };
        let stats = db.collection::<Document>(DELIVERY_STATS).namespace();
        let latency = db.collection::<Document>(DELIVERY_LATENCY).namespace();
        let mut models = Vec::new();
        for (key, n) in self.counts {
            if n == 0 {
                continue;
            }
            let hour = DateTime::from_millis(key.hour_ms);
            // A string `_id`: SecantusDB's update path scans for a sub-document `_id`.
            let id = format!(
                "{}|{}|{}|{}|{}{}",
                key.hour_ms, key.channel, key.event_type, key.provider, key.status, self.shard
            );
            let on_insert = doc! {"h": hour, "c": key.channel, "e": &key.event_type,
            "p": &key.provider, "s": key.status, "expire_at": expiry(hour)};
            models.push(upsert(
                &stats,
                doc! {"_id": id},
                doc! {"$inc": {"n": n}, "$setOnInsert": on_insert},
            ));
        }
        for ((hour_ms, channel), buckets) in self.latency {
            let mut inc = doc! {};
            for (bucket, count) in buckets {
                if count != 0 {
                    inc.insert(format!("lat.{bucket}"), count);
                }
            }
            if inc.is_empty() {
                continue;
            }
            let hour = DateTime::from_millis(hour_ms);
            models.push(upsert(
                &latency,
                doc! {"_id": format!("{hour_ms}|{channel}{}", self.shard)},
                doc! {"$inc": inc,
                "$setOnInsert": {"h": hour, "c": channel, "expire_at": expiry(hour)}},
            ));
        }
        models
    }
}

/// What to break the counts down by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatDimension {
    Day,
    Hour,
    Channel,
    Status,
    EventType,
    Provider,
}

impl StatDimension {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "day" => Self::Day,
            "hour" => Self::Hour,
            "channel" => Self::Channel,
            "status" => Self::Status,
            "event_type" => Self::EventType,
            "provider" => Self::Provider,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Hour => "hour",
            Self::Channel => "channel",
            Self::Status => "status",
            Self::EventType => "event_type",
            Self::Provider => "provider",
        }
    }

    fn expression(self) -> Bson {
        match self {
            Self::Day => Bson::Document(doc! {"$dateTrunc": {"date": "$h", "unit": "day"}}),
            Self::Hour => Bson::String("$h".to_owned()),
            Self::Channel => Bson::String("$c".to_owned()),
            Self::Status => Bson::String("$s".to_owned()),
            Self::EventType => Bson::String("$e".to_owned()),
            Self::Provider => Bson::String("$p".to_owned()),
        }
    }
}

/// One row of a breakdown: the dimension values and the number of deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct StatRow {
    pub key: BTreeMap<&'static str, Bson>,
    pub count: i64,
}

/// Outcome counts of a channel, or of one provider of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcomes {
    pub sent: i64,
    pub failed: i64,
    pub dead: i64,
    pub skipped: i64,
    pub pending: i64,
    pub delivered: i64,
    pub bounced: i64,
    pub undelivered: i64,
    /// Deliveries the recipient reported as spam, or unsubscribed from.
    pub complained: i64,
    pub unsubscribed: i64,
}

/// Per channel: outcome counts, per provider too, and accept-to-sent latency percentiles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelSummary {
    pub outcomes: Outcomes,
    /// By the provider that took (or refused) each delivery; skipped and pending
    /// deliveries have none.
    pub providers: BTreeMap<String, Outcomes>,
    /// (percentile, milliseconds), from the latency histogram.
    pub latency_ms: Vec<(f64, i64)>,
}

impl Outcomes {
    fn add(&mut self, status: &str, n: i64) {
        match status {
            "sent" => self.sent += n,
            "failed" => self.failed += n,
            "dead" => self.dead += n,
            "skipped" => self.skipped += n,
            "delivered" => self.delivered += n,
            "bounced" => self.bounced += n,
            "undelivered" => self.undelivered += n,
            "complained" => self.complained += n,
            "unsubscribed" => self.unsubscribed += n,
            _ => self.pending += n,
        }
    }

    /// Handed over: what a provider took (and may have reported on since).
    fn handed_over(&self) -> i64 {
        self.sent + self.delivered + self.bounced + self.undelivered
    }

    /// Complaints among those handed over (mailbox providers want it under 0.3%).
    pub fn complaint_rate(&self) -> Option<f64> {
        let handed = self.handed_over();
        (handed > 0).then(|| self.complained as f64 / handed as f64)
    }

    /// Handed over (and not reported lost since) among those that reached an outcome a
    /// provider decided (skips excluded).
    pub fn success_rate(&self) -> Option<f64> {
        let ok = self.sent + self.delivered;
        let decided = ok + self.failed + self.dead + self.bounced + self.undelivered;
        (decided > 0).then(|| ok as f64 / decided as f64)
    }

    /// Bounced (or reported undeliverable) among those handed over.
    pub fn bounce_rate(&self) -> Option<f64> {
        let handed = self.handed_over();
        (handed > 0).then(|| (self.bounced + self.undelivered) as f64 / handed as f64)
    }
}

/// Reads a percentile from histogram buckets (bucket, count), sorted by bucket.
pub fn percentile(buckets: &[(u32, i64)], p: f64) -> Option<i64> {
    let total: i64 = buckets.iter().map(|(_, n)| n).sum();
    if total <= 0 {
        return None;
    }
    let rank = ((p * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for (bucket, n) in buckets {
        seen += n;
        if seen >= rank {
            return Some(bucket_upper_ms(*bucket));
        }
    }
    buckets.last().map(|(b, _)| bucket_upper_ms(*b))
}

/// Rounds an instant down to its hour (rollups have hour resolution).
pub fn floor_hour(t: DateTime) -> DateTime {
    let ms = t.timestamp_millis();
    DateTime::from_millis(ms - ms.rem_euclid(HOUR_MS))
}

impl Store {
    pub(crate) fn stats(&self) -> Collection<Document> {
        self.db.collection(DELIVERY_STATS)
    }

    pub(crate) async fn index_stats(&self) -> anyhow::Result<()> {
        for name in [DELIVERY_STATS, DELIVERY_LATENCY] {
            self.db
                .collection::<Document>(name)
                .create_indexes([
                    IndexModel::builder().keys(doc! {"h": 1}).build(),
                    super::expiry_index(),
                ])
                .await?;
        }
        Ok(())
    }

    fn hour_range(since: DateTime, until: DateTime) -> Document {
        // An hour counts when it overlaps the range.
        doc! {"h": {"$gte": floor_hour(since), "$lt": until}}
    }

    /// Deliveries created in `[since, until)` (hour resolution), broken down by `by`.
    pub async fn delivery_stats(
        &self,
        since: DateTime,
        until: DateTime,
        by: &[StatDimension],
    ) -> anyhow::Result<Vec<StatRow>> {
        let mut group_id = Document::new();
        for d in by {
            group_id.insert(d.name(), d.expression());
        }
        // Deliveries, by status: the marks beside them are counted in the summaries.
        let mut deliveries = Self::hour_range(since, until);
        deliveries.insert("s", doc! {"$nin": Mark::ALL.to_vec()});
        let pipeline = [
            doc! {"$match": deliveries},
            doc! {"$group": {"_id": group_id, "count": {"$sum": "$n"}}},
            doc! {"$match": {"count": {"$ne": 0}}},
            doc! {"$sort": {"_id": 1}},
        ];
        let rows: Vec<Document> = self
            .stats()
            .aggregate(pipeline)
            .await
            .context("aggregating delivery stats")?
            .try_collect()
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let id = row.get_document("_id").cloned().unwrap_or_default();
                StatRow {
                    key: by
                        .iter()
                        .map(|d| (d.name(), id.get(d.name()).cloned().unwrap_or(Bson::Null)))
                        .collect(),
                    count: number(row.get("count")),
                }
            })
            .collect())
    }

    /// Outcome counts and latency percentiles per channel for deliveries created in the range.
    pub async fn channel_summaries(
        &self,
        since: DateTime,
        until: DateTime,
        percentiles: &[f64],
    ) -> anyhow::Result<BTreeMap<String, ChannelSummary>> {
        let counts: Vec<Document> = self
            .stats()
            .aggregate([
                doc! {"$match": Self::hour_range(since, until)},
                doc! {"$group": {"_id": {"c": "$c", "p": "$p", "s": "$s"}, "n": {"$sum": "$n"}}},
            ])
            .await
            .context("aggregating channel outcomes")?
            .try_collect()
            .await?;
        let mut out: BTreeMap<String, ChannelSummary> = BTreeMap::new();
        for row in counts {
            let id = row.get_document("_id").cloned().unwrap_or_default();
            let channel = id.get_str("c").unwrap_or_default().to_owned();
            let provider = id.get_str("p").unwrap_or_default();
            let status = id.get_str("s").unwrap_or_default();
            let n = number(row.get("n"));
            let summary = out.entry(channel).or_default();
            summary.outcomes.add(status, n);
            if !provider.is_empty() {
                summary
                    .providers
                    .entry(provider.to_owned())
                    .or_default()
                    .add(status, n);
            }
        }
        // A few thousand small documents a month: merged here, not unwound in a pipeline.
        let mut histograms: BTreeMap<String, BTreeMap<u32, i64>> = BTreeMap::new();
        let mut cursor = self
            .db
            .collection::<Document>(DELIVERY_LATENCY)
            .find(Self::hour_range(since, until))
            .projection(doc! {"c": 1, "lat": 1})
            .await
            .context("reading send latency")?;
        while let Some(doc) = cursor.try_next().await? {
            let (Ok(c), Ok(lat)) = (doc.get_str("c"), doc.get_document("lat")) else {
                continue;
            };
            let merged = histograms.entry(c.to_owned()).or_default();
            for (bucket, n) in lat {
                if let Ok(bucket) = bucket.parse::<u32>() {
                    *merged.entry(bucket).or_default() += number(Some(n));
                }
            }
        }
        for (channel, buckets) in histograms {
            let buckets: Vec<(u32, i64)> = buckets.into_iter().collect();
            let summary = out.entry(channel).or_default();
            summary.latency_ms = percentiles
                .iter()
                .filter_map(|p| Some((*p, percentile(&buckets, *p)?)))
                .collect();
        }
        Ok(out)
    }

    /// Rebuilds every rollup from the deliveries themselves (after a restore or an import
    /// of deliveries written by another tool); the live path keeps them true otherwise.
    pub async fn rebuild_stats(&self) -> anyhow::Result<()> {
        self.stats().delete_many(doc! {}).await?;
        self.db
            .collection::<Document>(DELIVERY_LATENCY)
            .delete_many(doc! {})
            .await?;
        let mut cursor = self
            .deliveries()
            .find(doc! {})
            .projection(doc! {"attempts": 0, "claim": 0})
            .batch_size(5_000)
            .await?;
        let mut moves = StatMoves::default();
        let mut pending = 0;
        while let Some(d) = cursor.try_next().await? {
            let status = match (d.status, &d.claim) {
                (DeliveryStatus::Sending, Some(c)) => c.from,
                (s, _) => s,
            };
            moves.add(
                &d,
                status,
                d.provider.as_deref(),
                1,
                latency_of(&d, d.sent_at),
            );
            if d.complained_at.is_some() {
                moves.mark(&d, Mark::Complained, d.provider.as_deref(), 1);
            }
            if d.unsubscribed_at.is_some() {
                moves.mark(&d, Mark::Unsubscribed, d.provider.as_deref(), 1);
            }
            pending += 1;
            if pending == 50_000 {
                self.write_moves(std::mem::take(&mut moves)).await?;
                pending = 0;
            }
        }
        self.write_moves(moves).await
    }

    async fn write_moves(&self, moves: StatMoves) -> anyhow::Result<()> {
        let mut session = self.client.start_session().await?;
        moves
            .write(&self.db, &mut session, self.retention.stats_days)
            .await?;
        Ok(())
    }
}

/// Accept-to-sent time of a delivery sent at `sent_at`.
pub(crate) fn latency_of(d: &DeliveryDoc, sent_at: Option<DateTime>) -> Option<i64> {
    let sent = sent_at?;
    let accepted = d.accepted_at.unwrap_or(d.created_at);
    Some(sent.timestamp_millis() - accepted.timestamp_millis())
}

pub(crate) fn number(b: Option<&Bson>) -> i64 {
    match b {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(f)) => *f as i64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_within_five_percent() {
        for ms in [0, 1, 7, 99, 250, 1_000, 12_345, 86_400_000] {
            let upper = bucket_upper_ms(latency_bucket(ms));
            assert!(upper >= ms, "{ms} -> {upper}");
            assert!(upper as f64 <= ms as f64 * 1.05 + 1.0, "{ms} -> {upper}");
        }
    }

    #[test]
    fn percentiles_walk_the_histogram() {
        let buckets = vec![(latency_bucket(10), 90), (latency_bucket(1_000), 10)];
        assert_eq!(
            percentile(&buckets, 0.5),
            Some(bucket_upper_ms(latency_bucket(10)))
        );
        assert_eq!(
            percentile(&buckets, 0.9),
            Some(bucket_upper_ms(latency_bucket(10)))
        );
        assert_eq!(
            percentile(&buckets, 0.99),
            Some(bucket_upper_ms(latency_bucket(1_000)))
        );
        assert_eq!(percentile(&[], 0.5), None);
    }
}
