//! Real loopback servers for tests and `herald chaos`: an SMTP sink with fault modes and a TCP proxy that can cut.

mod proxy;
mod smtp;

pub use proxy::TcpProxy;
pub use smtp::{Mail, SmtpServer};
