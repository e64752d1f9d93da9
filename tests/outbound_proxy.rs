//! The webhook client ignores `HTTP(S)_PROXY`: a proxy would resolve the target itself,
//! past the SSRF guard. Its own test binary, because it sets process-wide variables.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn a_guarded_client_never_goes_through_an_environment_proxy() {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", proxy.local_addr().expect("addr"));
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    tokio::spawn(async move {
        while let Ok((socket, _)) = proxy.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    for var in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(var);
    }
    for var in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
    ] {
        std::env::set_var(var, &url);
    }
    let guarded = herald::channels::http::client(Duration::from_secs(2), false).expect("client");
    // Through a proxy, a name would be resolved by the proxy, never by the guard. The
    // target here is a closed loopback port, so the test sends nothing off the machine.
    let _ = guarded.get("http://127.0.0.1:1/hook").send().await;
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "the guarded client went through the proxy"
    );
}
