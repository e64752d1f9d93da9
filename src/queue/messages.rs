//! Versioned job messages carried on the lanes; separate from domain and storage types.

use serde::{Deserialize, Serialize};

/// The only message version so far; a consumer rejects versions it does not know.
pub const VERSION: u32 = 1;

/// A unit of work for the worker pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// Expand a notification's audience into deliveries.
    Dispatch { notification_id: String },
    /// Expand several notifications' audiences: the events one group commit accepted on
    /// one lane, published as one message instead of one each.
    DispatchMany { notification_ids: Vec<String> },
    /// Send one delivery (recipient x channel).
    Deliver {
        delivery_id: String,
        notification_id: String,
    },
    /// Send a chunk of a notification's deliveries, each written once with its outcome.
    DeliverChunk {
        chunk_id: String,
        notification_id: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    job: Job,
}

impl Job {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings into JSON cannot fail.
        serde_json::to_vec(&Envelope {
            v: VERSION,
            job: self.clone(),
        })
        .unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<Self, String> {
        let env: Envelope =
            serde_json::from_slice(body).map_err(|e| format!("not a herald job: {e}"))?;
        if env.v != VERSION {
            return Err(format!("job version {} is not supported", env.v));
        }
        Ok(env.job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_round_trip_with_their_version() {
        let job = Job::Deliver {
            delivery_id: "d".into(),
            notification_id: "n".into(),
        };
        let body = job.encode();
        assert!(String::from_utf8_lossy(&body).contains("\"v\":1"));
        assert_eq!(Job::decode(&body), Ok(job));
        assert!(Job::decode(br#"{"v":9,"kind":"dispatch","notification_id":"n"}"#).is_err());
        let many = Job::DispatchMany {
            notification_ids: vec!["a".into(), "b".into()],
        };
        assert_eq!(Job::decode(&many.encode()), Ok(many));
    }
}
