//! A channel's ordered providers: rate limits per provider, circuit breakers, failover.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{DeliveryError, OutboundMessage, Provider, Receipt};
use crate::domain::Rate;

/// Sends per second with a burst; a 429 halves the rate, successes win it back.
pub struct TokenBucket {
    configured: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

struct BucketState {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A rate that is not a [`Rate`] cannot be built: a bucket's waits are always finite.
    pub fn new(rate: Rate, burst: f64) -> Self {
        let rate_per_sec = rate.per_sec();
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        Self {
            configured: rate_per_sec,
            burst,
            state: Mutex::new(BucketState {
                rate: rate_per_sec,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a token (never fails: a burst is smoothed, not refused).
    pub async fn acquire(&self) {
        while let Err(wait) = self.try_acquire() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes a token now, or says how long until one is there.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let mut s = self.lock();
        let now = Instant::now();
        s.tokens = (s.tokens + now.duration_since(s.last).as_secs_f64() * s.rate).min(self.burst);
        s.last = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            return Ok(());
        }
        // `rate` is at least a tenth of a `Rate`, so this is at most 10,000 s.
        Err(Duration::try_from_secs_f64((1.0 - s.tokens) / s.rate).unwrap_or(Duration::MAX))
    }

    /// The provider said 429: halve the rate (down to a tenth of the configured one).
    pub fn slow_down(&self) {
        let mut s = self.lock();
        s.rate = (s.rate / 2.0).max(self.configured / 10.0);
    }

    /// A success wins back a little of the configured rate.
    pub fn recover(&self) {
        let mut s = self.lock();
        s.rate = (s.rate * 1.05).min(self.configured);
    }

    pub fn current_rate(&self) -> f64 {
        self.lock().rate
    }
}

/// Opens after `threshold` consecutive transient failures; after `cooldown` one trial
/// goes through (half-open): success closes it, failure opens it again.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    trial_running: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a call go through now? The pass says how it went; a pass dropped unsettled
    /// (the call's future was dropped mid-send) frees a half-open breaker's trial slot,
    /// so the next call may try again instead of the provider staying blocked.
    pub fn allow(&self) -> Option<Pass<'_>> {
        let mut s = self.lock();
        let trial = match s.open_until {
            None => false,
            Some(t) if Instant::now() >= t && !s.trial_running => {
                s.trial_running = true;
                true
            }
            Some(_) => return None,
        };
        Some(Pass {
            breaker: self,
            trial,
            settled: false,
        })
    }

    fn success(&self) {
        let mut s = self.lock();
        *s = BreakerState::default();
    }

    fn failure(&self) {
        let mut s = self.lock();
        s.failures += 1;
        s.trial_running = false;
        if s.failures >= self.threshold {
            s.open_until = Some(Instant::now() + self.cooldown);
        }
    }

    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }

    /// How long until an open breaker lets a trial through (`None` when it would now).
    pub fn closed_for(&self) -> Option<Duration> {
        let until = self.lock().open_until?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }
}

/// Leave to call a provider once; settle it with [`Pass::success`] or [`Pass::failure`].
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    trial: bool,
    settled: bool,
}

impl Pass<'_> {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.success();
    }

    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.failure();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.trial && !self.settled {
            self.breaker.lock().trial_running = false;
        }
    }
}

/// One provider with its guards.
pub struct Member {
    pub provider: Box<dyn Provider>,
    pub limiter: Option<TokenBucket>,
    pub breaker: Breaker,
}

/// The providers of one channel, tried in order.
pub struct Chain {
    members: Vec<Member>,
}

impl Chain {
    pub fn new(members: Vec<Member>) -> Self {
        Self { members }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }
}

#[async_trait]
impl Provider for Chain {
    fn name(&self) -> &str {
        self.members.first().map_or("none", |m| m.provider.name())
    }

    /// A transient failure or an open breaker moves on to the next provider; a permanent
    /// failure is the recipient's and is returned at once (another provider would fail too),
    /// and so is an unknown outcome (another provider could deliver it twice).
    async fn send(&self, message: &OutboundMessage) -> Result<Receipt, DeliveryError> {
        // The last provider that was called and failed; else the open breaker whose trial
        // comes first (a wait of `None`: its cool-down is over, another call's trial is
        // under way, and the usual backoff applies).
        let mut last: Option<DeliveryError> = None;
        let mut soonest: Option<(&str, Option<Duration>)> = None;
        for m in &self.members {
            let Some(pass) = m.breaker.allow() else {
                let wait = m.breaker.closed_for();
                if soonest.is_none_or(|(_, w)| wait < w) {
                    soonest = Some((m.provider.name(), wait));
                }
                continue;
            };
            if let Some(l) = &m.limiter {
                l.acquire().await;
            }
            match m.provider.send(message).await {
                Ok(r) => {
                    pass.success();
                    if let Some(l) = &m.limiter {
                        l.recover();
                    }
                    return Ok(r);
                }
                Err(e @ DeliveryError::Permanent { .. }) => {
                    pass.success();
                    return Err(e);
                }
                Err(e @ DeliveryError::Unknown { .. }) => {
                    // It may have been delivered: another provider could send it twice.
                    pass.failure();
                    return Err(e);
                }
                Err(e) => {
                    pass.failure();
                    if let (
                        DeliveryError::Transient {
                            throttled: true, ..
                        },
                        Some(l),
                    ) = (&e, &m.limiter)
                    {
                        l.slow_down();
                    }
                    tracing::warn!(provider = m.provider.name(), error = %e, "provider failed; trying the next");
                    last = Some(e);
                }
            }
        }
        // Only open breakers: nothing was sent nor attempted; tried again no sooner than
        // the first of them lets a trial through.
        let breaker_open = soonest.map(|(provider, wait)| DeliveryError::CircuitOpen {
            provider: provider.to_owned(),
            retry_after: wait,
        });
        Err(last
            .or(breaker_open)
            .unwrap_or_else(|| DeliveryError::transient("none", "the channel has no providers")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_opens_after_n_failures_and_half_opens_after_the_cooldown() {
        let b = Breaker::new(2, Duration::from_millis(30));
        b.allow().expect("closed").failure();
        b.allow().expect("one failure is not enough").failure();
        assert!(b.allow().is_none(), "open");
        std::thread::sleep(Duration::from_millis(40));
        let trial = b.allow().expect("half-open: one trial");
        assert!(b.allow().is_none(), "only one trial at a time");
        trial.success();
        assert!(b.allow().is_some() && !b.is_open(), "closed again");
    }

    #[test]
    fn an_open_breaker_says_how_long_until_its_trial() {
        let b = Breaker::new(1, Duration::from_secs(30));
        assert_eq!(b.closed_for(), None, "closed");
        b.allow().expect("closed").failure();
        let left = b.closed_for().expect("open");
        assert!(left > Duration::from_secs(29) && left <= Duration::from_secs(30));
    }

    /// A provider that never answers.
    struct Hangs;

    #[async_trait]
    impl Provider for Hangs {
        fn name(&self) -> &str {
            "hangs"
        }
        async fn send(&self, _: &OutboundMessage) -> Result<Receipt, DeliveryError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_trial_whose_send_is_dropped_frees_the_breaker_for_the_next_call() {
        let chain = Chain::new(vec![Member {
            provider: Box::new(Hangs),
            limiter: None,
            breaker: Breaker::new(1, Duration::from_millis(10)),
        }]);
        chain.members()[0]
            .breaker
            .allow()
            .expect("closed")
            .failure();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let message = OutboundMessage {
            delivery_id: "d".into(),
            destination: super::super::Destination::Phone("+15550100".into()),
            content: crate::templates::Rendered::Sms { text: "hi".into() },
            unsubscribe_url: None,
        };
        let dropped = tokio::time::timeout(Duration::from_millis(20), chain.send(&message)).await;
        assert!(dropped.is_err(), "the trial hung and was dropped");
        assert!(
            chain.members()[0].breaker.allow().is_some(),
            "a dropped trial must not block the provider for good"
        );
    }

    #[test]
    fn a_rate_a_bucket_cannot_honour_is_refused_and_the_slowest_one_answers_a_wait() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30, 2e9] {
            assert!(Rate::new(bad).is_err(), "{bad}");
        }
        let slowest = TokenBucket::new(Rate::new(Rate::MIN).expect("rate"), 1.0);
        assert!(slowest.try_acquire().is_ok());
        for _ in 0..20 {
            slowest.slow_down();
        }
        let wait = slowest.try_acquire().expect_err("no second token");
        assert!(wait <= Duration::from_secs(10_000), "{wait:?}");
    }

    #[tokio::test]
    async fn a_token_bucket_spaces_a_burst_and_slows_down_on_429() {
        let bucket = TokenBucket::new(Rate::new(20.0).expect("rate"), 1.0);
        let started = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(190),
            "{:?}",
            started.elapsed()
        );
        bucket.slow_down();
        assert!((bucket.current_rate() - 10.0).abs() < 1e-9);
        for _ in 0..100 {
            bucket.slow_down();
        }
        assert!(
            (bucket.current_rate() - 2.0).abs() < 1e-9,
            "floor at a tenth"
        );
    }
}
