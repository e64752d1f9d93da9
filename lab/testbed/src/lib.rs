//! Real loopback servers for herald's tests and its lab (bench, fault suite): an SMTP sink with fault modes and a TCP proxy that can cut.

mod proxy;
mod smtp;

pub use proxy::TcpProxy;
pub use smtp::{Mail, SmtpServer};
