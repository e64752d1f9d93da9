//! Cron campaigns: fire times, misfire plans, and the tick that claims due slots exactly once.

pub mod cron;
pub mod plan;
