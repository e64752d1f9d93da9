//! Claims: a delivery is marked `sending` with its attempt's id before its provider is called.

use std::collections::{BTreeMap, HashMap, HashSet};

use mongodb::bson::{doc, Document};

use super::documents::{DeliveryClaim, DeliveryDoc};
use super::txn::{conflict_pause, is_temporary, CONFLICT_TRIES};
use super::{by_ids, ids_found, now, Store};
use crate::domain::DeliveryStatus;

impl Store {
    /// Claims a waiting delivery for one attempt; `None` when another worker holds it or
    /// it is no longer waiting, else the attempt's id.
    pub async fn claim_delivery(
        &self,
        id: &str,
        from: DeliveryStatus,
        worker: &str,
    ) -> anyhow::Result<Option<String>> {
        let claim = DeliveryClaim {
            delivery_id: id.to_owned(),
            from,
            worker: worker.to_owned(),
        };
        Ok(self.claim_deliveries(&[claim]).await?.remove(0))
    }

    /// Claims many deliveries; returns, per claim, the attempt id when this worker got the
    /// delivery. Claims that expect the same status share one conditional `update_many`
    /// and one attempt id (an attempt is identified by delivery and attempt id together):
    /// on SecantusDB one multi-document update costs about a third of as many single ones.
    pub async fn claim_deliveries(
        &self,
        claims: &[DeliveryClaim],
    ) -> anyhow::Result<Vec<Option<String>>> {
        let mut groups: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
        // Two copies of one delivery's job (a dispatch republished after a lost link) can
        // ask in the same round trip: only the first may claim, or both would read the
        // shared attempt id back as theirs and send.
        let mut asked = HashSet::new();
        for (i, c) in claims.iter().enumerate() {
            if !asked.insert(c.delivery_id.as_str()) {
                continue;
            }
            groups
                .entry((c.from.as_str(), c.worker.as_str()))
                .or_default()
                .push(i);
        }
        let mut claimed = vec![None; claims.len()];
        for ((from, worker), members) in groups {
            let ids: Vec<&str> = members
                .iter()
                .map(|&i| claims[i].delivery_id.as_str())
                .collect();
            let token = uuid::Uuid::now_v7().to_string();
            let got = self.claim_group(&ids, from, worker, &token).await?;
            for (&i, id) in members.iter().zip(&ids) {
                if got.contains(id) {
                    claimed[i] = Some(token.clone());
                }
            }
        }
        Ok(claimed)
    }

    /// One group of [`Store::claim_deliveries`]: the ids that now carry `token`.
    async fn claim_group<'a>(
        &self,
        ids: &[&'a str],
        from: &str,
        worker: &str,
        token: &str,
    ) -> anyhow::Result<HashSet<&'a str>> {
        let at = now();
        let claim = doc! {"attempt_id": token, "from": from, "claimed_at": at, "worker": worker};
        let mut round = 0;
        let modified = loop {
            // A write conflict may leave some of the group claimed, and a lost connection
            // may have taken the answer of a claim the server made: writing again claims
            // the rest (the claimed ones no longer match), and the read below says which.
            // Given up, the claimed ones would wait out the claim timeout and be recorded
            // `outcome_unknown`, although nothing was sent.
            match self
                .deliveries()
                .update_many(
                    doc! {"_id": {"$in": ids}, "status": from},
                    doc! {"$set": {"status": "sending", "claim": &claim, "updated_at": at}},
                )
                .await
            {
                Ok(r) if round == 0 => break r.modified_count,
                Ok(_) => break 0,
                Err(e) => {
                    let e = anyhow::Error::new(e);
                    if !is_temporary(&e) || round + 1 >= CONFLICT_TRIES {
                        return Err(e.context("claiming deliveries"));
                    }
                    conflict_pause(round).await;
                    round += 1;
                }
            }
        };
        if modified == ids.len() as u64 {
            return Ok(ids.iter().copied().collect());
        }
        let deliveries = self.deliveries().clone_with_type::<Document>();
        let mine: HashSet<String> =
            ids_found(deliveries.find(doc! {"_id": {"$in": ids}, "claim.attempt_id": token}))
                .await?;
        Ok(ids
            .iter()
            .copied()
            .filter(|id| mine.contains(*id))
            .collect())
    }

    /// Deliveries by id, in one round trip.
    pub async fn get_deliveries(
        &self,
        ids: &[String],
    ) -> anyhow::Result<HashMap<String, Result<DeliveryDoc, String>>> {
        by_ids(&self.deliveries(), ids).await
    }
}
