//! Live traffic counters: requests in flight, the time of the newest request, open
//! connections. The drain decides on these; metrics read them at scrape time.
//!
//! Owns counting only. It holds no phase and makes no decision: the lifecycle reads it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub struct Activity {
    epoch: Instant,
    inflight: AtomicUsize,
    /// One plus the nanoseconds from `epoch` to the newest request head; 0 before the first.
    last_request: AtomicU64,
    conns: [AtomicUsize; 2],
    /// HTTP/1.1 connections parked (idle, held without their HTTP state), and a signal each
    /// time one is parked.
    parked: AtomicUsize,
    parked_signal: Notify,
    /// Woken when in-flight drops to zero.
    idle: Notify,
}

impl Activity {
    pub fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_request: AtomicU64::new(0),
            conns: [AtomicUsize::new(0), AtomicUsize::new(0)],
            parked: AtomicUsize::new(0),
            parked_signal: Notify::new(),
            idle: Notify::new(),
        }
    }

    #[inline]
    pub fn request_started(&self, now: Instant) {
        self.inflight.fetch_add(1, SeqCst);
        let ns = u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_request.fetch_max(ns + 1, Relaxed);
    }

    #[inline]
    pub fn request_finished(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 {
            self.idle.notify_one();
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(SeqCst)
    }

    /// When the newest request head arrived, if any did.
    pub fn last_request(&self) -> Option<Instant> {
        match self.last_request.load(Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns - 1)),
        }
    }

    /// Resolves once in-flight has dropped to zero (at once if it is zero).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn connection_opened(&self, h2: bool) -> ConnCount<'_> {
        self.conns[usize::from(h2)].fetch_add(1, Relaxed);
        ConnCount { activity: self, h2 }
    }

    pub fn connections(&self) -> [usize; 2] {
        [self.conns[0].load(Relaxed), self.conns[1].load(Relaxed)]
    }

    /// Counts a connection as parked until the returned value is dropped.
    pub fn connection_parked(&self) -> ParkedCount<'_> {
        self.parked.fetch_add(1, SeqCst);
        self.parked_signal.notify_waiters();
        ParkedCount { activity: self }
    }

    /// HTTP/1.1 connections parked now (a subset of the open ones).
    pub fn parked(&self) -> usize {
        self.parked.load(SeqCst)
    }

    /// Resolves once at least `n` connections are parked.
    pub async fn wait_parked(&self, n: usize) {
        loop {
            let signal = self.parked_signal.notified();
            if self.parked() >= n {
                return;
            }
            signal.await;
        }
    }
}

/// Decrements the parked count when dropped.
pub struct ParkedCount<'a> {
    activity: &'a Activity,
}

impl Drop for ParkedCount<'_> {
    fn drop(&mut self) {
        self.activity.parked.fetch_sub(1, SeqCst);
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the open-connection count when dropped.
pub struct ConnCount<'a> {
    activity: &'a Activity,
    h2: bool,
}

impl Drop for ConnCount<'_> {
    fn drop(&mut self) {
        self.activity.conns[usize::from(self.h2)].fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_request_tracks_the_newest_head() {
        let a = Activity::new();
        assert!(a.last_request().is_none());
        let t = Instant::now();
        a.request_started(t);
        a.request_started(t - Duration::from_millis(5));
        let seen = a.last_request().unwrap();
        assert!(seen >= t - Duration::from_micros(1) && seen <= t + Duration::from_micros(1));
        assert_eq!(a.inflight(), 2);
        a.request_finished();
        a.request_finished();
        assert_eq!(a.inflight(), 0);
    }

    #[tokio::test]
    async fn wait_idle_wakes_when_the_last_request_ends() {
        let a = std::sync::Arc::new(Activity::new());
        a.request_started(Instant::now());
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.request_finished();
        waiter.await.unwrap();
    }
}
