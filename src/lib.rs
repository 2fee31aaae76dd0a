//! drainproxy: a sidecar reverse proxy that drains on measured idleness.
//! See ARCHITECTURE.md for the codemap and the invariants.

pub mod accepted;
pub mod activity;
pub mod admin;
pub mod app;
pub mod body;
pub mod cli;
pub mod config;
pub mod cork;
pub mod demo;
pub mod demo_app;
pub mod error;
pub mod fast;
pub mod goaway;
pub mod health;
pub mod hooks;
pub mod inject;
pub mod lean;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod sock;
pub mod tls;
pub mod upstream;
pub mod warmup;

/// A small deterministic generator (xorshift64*) for the unit tests' random cases: the same
/// on every run, so a failing case is found again. Each call gives a number below `n`.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}
