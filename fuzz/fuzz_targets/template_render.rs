//! Any text as an untrusted template (and JSON after a NUL as its data): no panic, and the
//! output stays within herald's bound.
#![no_main]

use herald::domain::Channel;
use herald::templates::{Origin, PartSource, Rendered, Templates, MAX_OUTPUT_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, ctx) = text.split_once('\0').unwrap_or((text, "{}"));
    let ctx: serde_json::Value = serde_json::from_str(ctx).unwrap_or_default();
    let part = |part: &'static str| PartSource {
        event_type: "fuzz".into(),
        part,
        locale: None,
        source: source.to_owned(),
        origin: Origin::Api,
    };
    let Ok(t) = Templates::from_parts(vec![part("email.subject"), part("email.html")]) else {
        return;
    };
    if let Ok(Rendered::Email { subject, html, .. }) = t.render("fuzz", Channel::Email, None, &ctx) {
        assert!(subject.len() <= MAX_OUTPUT_BYTES);
        assert!(html.map_or(0, |h| h.len()) <= MAX_OUTPUT_BYTES);
    }
});
