//! Outbound HTTP for webhooks: an SSRF guard in DNS resolution, no redirects, bounded
//! time and size, and HMAC signatures receivers can verify.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Anything but a globally routed unicast address: never a webhook target unless config
/// allows it. IPv4: this network, private, shared (CGNAT), loopback, link-local, IETF
/// protocol assignments, documentation, benchmarking, multicast and reserved (with
/// broadcast). IPv6: unspecified, loopback, unique-local, link- and site-local,
/// multicast, documentation, and the translation and tunnel prefixes that embed an IPv4
/// address (IPv4-mapped and -compatible, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`,
/// 6to4 `2002::/16`, Teredo `2001::/32`) — they can reach an internal IPv4 host.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            a == 0 // 0.0.0.0/8
                || a == 10
                || a == 127
                || (a == 100 && (64..128).contains(&b)) // 100.64.0.0/10
                || (a == 169 && b == 254)
                || (a == 172 && (16..32).contains(&b))
                || (a == 192 && b == 0 && c == 0) // 192.0.0.0/24
                || (a == 192 && b == 0 && c == 2)
                || (a == 192 && b == 168)
                || (a == 198 && (18..20).contains(&b)) // 198.18.0.0/15
                || (a == 198 && b == 51 && c == 100)
                || (a == 203 && b == 0 && c == 113)
                || a >= 224 // multicast 224/4, reserved 240/4, broadcast
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || s[..6] == [0; 6] // IPv4-compatible ::a.b.c.d (deprecated)
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site local fec0::/10
                || (s[0] & 0xff00) == 0xff00 // multicast
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64 64:ff9b::/96, 64:ff9b:1::/48
                || s[0] == 0x2002 // 6to4
                || (s[0] == 0x2001 && s[1] == 0) // Teredo
        }
    }
}

/// Resolves names and drops internal addresses, so a name cannot be pointed at an
/// internal service between a check and the connection (DNS rebinding).
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves only to internal addresses").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Why a target is refused before any request.
pub fn check_target(url: &reqwest::Url, allow_internal: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {} is not allowed", url.scheme()));
    }
    if allow_internal {
        return Ok(());
    }
    match url.host() {
        Some(url::Host::Ipv4(ip)) if is_internal(IpAddr::V4(ip)) => {
            Err(format!("{ip} is an internal address"))
        }
        Some(url::Host::Ipv6(ip)) if is_internal(IpAddr::V6(ip)) => {
            Err(format!("{ip} is an internal address"))
        }
        Some(url::Host::Domain(d))
            if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
        {
            Err(format!("{d} is an internal name"))
        }
        None => Err("the URL has no host".to_owned()),
        _ => Ok(()),
    }
}

/// An outbound client: no redirects, a timeout, and guarded DNS unless internal targets
/// are allowed (providers configured by ops may live anywhere; webhook targets may not).
pub fn client(timeout: Duration, allow_internal: bool) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if !allow_internal {
        // A proxy from HTTP(S)_PROXY would resolve the target itself, past the guard.
        builder = builder.dns_resolver(Arc::new(GuardedResolver)).no_proxy();
    }
    Ok(builder.build()?)
}

/// `sha256=<hex HMAC of "<timestamp>.<body>">`: receivers recompute it with the shared
/// secret and reject old timestamps (replays).
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let tag =
        crate::domain::signatures::hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", body]);
    format!("sha256={}", hex::encode(tag))
}

/// Seconds in a `Retry-After` header.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Reads at most `limit` bytes of a response body (a webhook answer is not ours to store).
pub async fn bounded_body(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_targets_are_refused() {
        for url in [
            "http://127.0.0.1/x",
            "http://10.1.2.3/",
            "http://192.168.0.1",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://localhost:8080/",
            "ftp://example.com/",
            "http://100.64.0.1/",
            "http://0.1.2.3/",
            "http://198.18.0.1/",
            "http://240.0.0.1/",
            "http://224.0.0.251/",
            "http://[64:ff9b::7f00:1]/",
            "http://[2002:7f00:1::1]/",
            "http://[::127.0.0.1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[fec0::1]/",
            "http://[2001:db8::1]/",
        ] {
            let u = reqwest::Url::parse(url).expect("url");
            assert!(check_target(&u, false).is_err(), "{url}");
            assert!(
                url.starts_with("ftp") || check_target(&u, true).is_ok(),
                "{url} allowed by config"
            );
        }
        for public in [
            "https://hooks.example.com/a",
            "http://93.184.216.34/",
            "http://[2606:4700::1111]/",
        ] {
            let u = reqwest::Url::parse(public).expect("url");
            assert!(check_target(&u, false).is_ok(), "{public}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            signature("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }
}
