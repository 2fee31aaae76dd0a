//! drainproxy: a sidecar reverse proxy that drains on measured idleness.
//! See ARCHITECTURE.md for the codemap and the invariants.

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
