//! The app warm-up (DESIGN §5): the configured requests reach the app before `/ready` turns
//! 200, bounded, and again after the app restarts. Held requests are released with explicit
//! signals.

use drainproxy::config::{Config, Dur, WarmupRequest};
use drainproxy::lifecycle::{Event, Phase, Trigger};
use std::sync::atomic::Ordering;

use crate::support::*;

fn warm_up_with(c: &mut Config, requests: &[(&str, u32)]) {
    c.warmup.requests = requests
        .iter()
        .map(|(path, count)| WarmupRequest {
            method: "GET".into(),
            path: (*path).into(),
            headers: Default::default(),
            body: String::new(),
            count: *count,
        })
        .collect();
}

fn warmup_outcome(m: &str, outcome: &str) -> f64 {
    metric(m, "drainproxy_warmup_requests_total", &[("outcome", outcome)])
}

#[tokio::test]
async fn ready_only_once_the_warm_up_requests_were_answered() {
    let app = app().await;
    let p = proxy(app.addr, |c| warm_up_with(c, &[("/hold", 1), ("/warm", 3)])).await;
    app.state.hold.started.notified().await;
    let state = p.state.borrow().clone();
    assert_eq!((state.phase, state.reason), (Phase::Starting, "app healthy; warming it up"));
    assert_eq!(get(p.admin_addr, "/ready").await.status, 503);
    assert_eq!(get(p.proxy_addr, "/").await.status, 200, "requests are forwarded while warming up");
    app.state.hold.release.notify_one();
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(p.state.borrow().reason, "app healthy and warmed up");
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 5, "4 warm-up requests and the proxied one");
    let ua = app.state.last_headers.lock().unwrap()["user-agent"].clone();
    assert!(ua.to_str().unwrap().starts_with("drainproxy-warmup/"), "{ua:?}");
    assert_eq!(warmup_outcome(&metrics(&p).await, "2xx"), 4.0);
}

#[tokio::test]
async fn warm_up_answers_without_a_2xx_are_counted_and_do_not_block_readiness() {
    let app = app().await;
    let p = proxy(app.addr, |c| warm_up_with(c, &[("/early?status=500", 2), ("/warm", 1)])).await;
    wait_phase(&p, Phase::Ready).await;
    let m = metrics(&p).await;
    assert_eq!((warmup_outcome(&m, "other_status"), warmup_outcome(&m, "2xx")), (2.0, 1.0));
}

#[tokio::test]
async fn a_warm_up_is_cut_at_its_timeout_and_the_proxy_turns_ready() {
    let app = app().await;
    let p = proxy(app.addr, |c| {
        warm_up_with(c, &[("/hold", 1), ("/warm", 1)]);
        c.warmup.timeout = Dur::millis(300);
    })
    .await;
    app.state.hold.started.notified().await;
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(p.state.borrow().reason, "app healthy; warm-up cut at its timeout");
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 1, "nothing after the cut");
    app.state.hold.release.notify_one();
}

#[tokio::test]
async fn a_drain_during_the_warm_up_stops_it() {
    let app = app().await;
    let p = proxy(app.addr, |c| {
        warm_up_with(c, &[("/hold", 1), ("/warm", 5)]);
        c.drain.min_delay = Dur::millis(100);
    })
    .await;
    app.state.hold.started.notified().await;
    p.events.send(Event::Drain(Trigger::Http)).await.unwrap();
    wait_phase(&p, Phase::Drained).await;
    app.state.hold.release.notify_one();
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 1, "the warm-up stopped at its first request");
    assert_eq!(warmup_outcome(&metrics(&p).await, "2xx"), 0.0);
}

#[tokio::test]
async fn a_restarted_app_is_warmed_up_again_before_the_proxy_resumes() {
    let app = app().await;
    let state = app.state.clone();
    let p = proxy(app.addr, |c| warm_up_with(c, &[("/hold", 1)])).await;
    state.hold.started.notified().await;
    state.hold.release.notify_one();
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(get(p.admin_addr, "/drain").await.status, 200);
    let _app = restart_app(&p, app).await;
    state.hold.started.notified().await;
    assert_eq!(p.state.borrow().phase, Phase::Starting, "not ready before the new app is warm");
    assert_eq!(get(p.admin_addr, "/ready").await.status, 503);
    state.hold.release.notify_one();
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(warmup_outcome(&metrics(&p).await, "2xx"), 2.0);
}

#[tokio::test]
async fn an_h2c_app_is_warmed_up_over_http2() {
    let app = app().await;
    let p = proxy(app.addr, |c| {
        c.upstream.protocol = drainproxy::config::UpstreamProtocol::H2c;
        warm_up_with(c, &[("/warm", 3)]);
    })
    .await;
    wait_phase(&p, Phase::Ready).await;
    assert_eq!(p.state.borrow().reason, "app healthy and warmed up");
    assert_eq!(app.state.requests.load(Ordering::SeqCst), 3);
    // HTTP/2 carries the authority in the request line; only HTTP/1.1 needs a Host header.
    assert!(!app.state.last_headers.lock().unwrap().contains_key("host"), "sent over HTTP/1.1");
    assert_eq!(warmup_outcome(&metrics(&p).await, "2xx"), 3.0);
}
