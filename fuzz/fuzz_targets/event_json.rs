//! Any bytes as an event body: no panic, and every refusal has a stable code.
#![no_main]

use herald::domain::event::{parse_event, EventLimits};
use libfuzzer_sys::fuzz_target;

const CODES: [&str; 4] = [
    "malformed_json",
    "validation_failed",
    "no_recipients",
    "payload_too_large",
];

fuzz_target!(|data: &[u8]| {
    let limits = EventLimits {
        max_payload_bytes: 262_144,
        max_inline_recipients: 10_000,
    };
    if let Err(e) = parse_event(data, None, limits) {
        assert!(CODES.contains(&e.code()), "unexpected code {}", e.code());
    }
});
