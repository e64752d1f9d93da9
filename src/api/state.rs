//! The handles an API handler can extract from the startup `Context` (axum's `FromRef`):
//! each handler names the few it uses, not the whole context.

use std::sync::Arc;

use axum::extract::FromRef;

use crate::app::{Context, TemplateSync};
use crate::channels::sns::SnsVerifier;
use crate::config::Settings;
use crate::ingest::Intake;
use crate::metrics::Metrics;
use crate::outbox::Relay;
use crate::queue::Broker;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::templates::Templates;
use crate::worker::Worker;

macro_rules! handles {
    ($($field:ident: $ty:ty),* $(,)?) => {
        $(impl FromRef<Context> for $ty {
            fn from_ref(ctx: &Context) -> Self {
                ctx.$field.clone()
            }
        })*
    };
}

handles! {
    settings: Arc<Settings>,
    store: Store,
    broker: Arc<Broker>,
    templates: Arc<Templates>,
    metrics: Arc<Metrics>,
    relay: Relay,
    scheduler: Scheduler,
    worker: Worker,
    intake: Intake,
    template_sync: TemplateSync,
    sns: Arc<SnsVerifier>,
}
