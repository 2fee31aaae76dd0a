//! One integration-test binary (one link step). Modules follow the issues' contracts.
#![expect(clippy::unwrap_used, reason = "test set-up fails loudly; a panic is the report")]

mod binary;
mod deploy;
mod drain;
mod fast;
mod hooks;
mod inject;
mod peers;
mod proxy;
mod support;
mod tls;
mod warmup;
