//! Handlebars templates from `templates/<event_type>/<part>[.<locale>].hbs`, built once, strict.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context as _;
use handlebars::Handlebars;
use serde_json::Value;

use crate::domain::Channel;

/// The parts a channel's message is made of. HTML parts are escaped; the rest are not.
const PARTS: [&str; 6] = [
    "email.subject",
    "email.html",
    "email.txt",
    "push.title",
    "push.body",
    "sms",
];

/// A rendered message for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Email {
        subject: String,
        html: Option<String>,
        text: Option<String>,
    },
    Sms {
        text: String,
    },
    Push {
        title: String,
        body: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// No usable template: recorded as `template_missing`.
    #[error("no {channel} template for event type `{event_type}`")]
    Missing {
        event_type: String,
        channel: Channel,
    },
    /// The template failed on this context (strict mode: a missing variable is an error).
    #[error("rendering {name} failed: {reason}")]
    Render { name: String, reason: String },
}

impl TemplateError {
    /// The stable reason recorded on the delivery.
    pub fn reason(&self) -> &'static str {
        match self {
            TemplateError::Missing { .. } => "template_missing",
            TemplateError::Render { .. } => "template_error",
        }
    }
}

/// Every template, compiled at start.
pub struct Templates {
    escaped: Handlebars<'static>,
    plain: Handlebars<'static>,
    names: HashSet<String>,
}

fn key(event_type: &str, part: &str, locale: Option<&str>) -> String {
    format!("{event_type}/{part}/{}", locale.unwrap_or("_"))
}

fn valid_locale(s: &str) -> bool {
    let mut pieces = s.split('-');
    let lang_ok = pieces
        .next()
        .is_some_and(|l| (2..=3).contains(&l.len()) && l.chars().all(|c| c.is_ascii_alphabetic()));
    lang_ok
        && pieces
            .all(|p| !p.is_empty() && p.len() <= 8 && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// `pt-BR` -> [`pt-BR`, `pt`, default].
fn locale_chain(locale: Option<&str>) -> Vec<Option<&str>> {
    let mut chain = Vec::new();
    if let Some(l) = locale.filter(|l| valid_locale(l)) {
        let mut cut = l;
        loop {
            chain.push(Some(cut));
            match cut.rfind('-') {
                Some(i) => cut = &cut[..i],
                None => break,
            }
        }
    }
    chain.push(None);
    chain
}

impl Templates {
    fn empty() -> Self {
        let mut escaped = Handlebars::new();
        escaped.set_strict_mode(true);
        let mut plain = Handlebars::new();
        plain.set_strict_mode(true);
        plain.register_escape_fn(handlebars::no_escape);
        Self {
            escaped,
            plain,
            names: HashSet::new(),
        }
    }

    /// Loads and compiles every template under `dir`; a template that does not compile
    /// stops the start with its path. A missing directory means no templates.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut t = Self::empty();
        let Ok(types) = std::fs::read_dir(dir) else {
            tracing::warn!(dir = %dir.display(), "no templates directory");
            return Ok(t);
        };
        for entry in types {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let event_type = entry.file_name().to_string_lossy().into_owned();
            for file in std::fs::read_dir(entry.path())? {
                let path = file?.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(stem) = name.strip_suffix(".hbs") else {
                    continue;
                };
                let parsed = PARTS.iter().find_map(|part| {
                    if stem == *part {
                        Some((*part, None))
                    } else {
                        stem.strip_prefix(part)
                            .and_then(|rest| rest.strip_prefix('.'))
                            .filter(|l| valid_locale(l))
                            .map(|l| (*part, Some(l)))
                    }
                });
                let Some((part, locale)) = parsed else {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not <part>[.<locale>].hbs");
                    continue;
                };
                let source = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                t.add(&event_type, part, locale, &source)
                    .with_context(|| format!("compiling {}", path.display()))?;
            }
        }
        tracing::info!(count = t.names.len(), dir = %dir.display(), "templates loaded");
        Ok(t)
    }

    /// Adds one template part (from a file or, later, the API).
    pub fn add(
        &mut self,
        event_type: &str,
        part: &str,
        locale: Option<&str>,
        source: &str,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(PARTS.contains(&part), "unknown template part `{part}`");
        let name = key(event_type, part, locale);
        let registry = if part.ends_with(".html") {
            &mut self.escaped
        } else {
            &mut self.plain
        };
        registry.register_template_string(&name, source)?;
        self.names.insert(name);
        Ok(())
    }

    fn has(&self, event_type: &str, part: &str) -> bool {
        self.names
            .iter()
            .any(|n| n.starts_with(&format!("{event_type}/{part}/")))
    }

    /// The channels an event type has templates for (the default when an event names none).
    pub fn channels_for(&self, event_type: &str) -> Vec<Channel> {
        Channel::ALL
            .into_iter()
            .filter(|c| match c {
                Channel::Email => self.has(event_type, "email.subject"),
                Channel::Sms => self.has(event_type, "sms"),
                Channel::Push => {
                    self.has(event_type, "push.title") || self.has(event_type, "push.body")
                }
            })
            .collect()
    }

    /// Renders one part with locale fallback; `Ok(None)` when no locale has it.
    fn part(
        &self,
        event_type: &str,
        part: &str,
        locale: Option<&str>,
        ctx: &Value,
    ) -> Result<Option<String>, TemplateError> {
        for l in locale_chain(locale) {
            let name = key(event_type, part, l);
            if !self.names.contains(&name) {
                continue;
            }
            let registry = if part.ends_with(".html") {
                &self.escaped
            } else {
                &self.plain
            };
            return registry
                .render(&name, ctx)
                .map(Some)
                .map_err(|e| TemplateError::Render {
                    name: format!("{event_type}/{part}"),
                    reason: e.to_string(),
                });
        }
        Ok(None)
    }

    /// Renders the message for `channel` in the recipient's locale (falling back to
    /// the language, then the default).
    pub fn render(
        &self,
        event_type: &str,
        channel: Channel,
        locale: Option<&str>,
        ctx: &Value,
    ) -> Result<Rendered, TemplateError> {
        let missing = || TemplateError::Missing {
            event_type: event_type.to_owned(),
            channel,
        };
        match channel {
            Channel::Email => {
                let subject = self
                    .part(event_type, "email.subject", locale, ctx)?
                    .ok_or_else(missing)?;
                let html = self.part(event_type, "email.html", locale, ctx)?;
                let text = self.part(event_type, "email.txt", locale, ctx)?;
                if html.is_none() && text.is_none() {
                    return Err(missing());
                }
                Ok(Rendered::Email {
                    subject: subject.trim().to_owned(),
                    html,
                    text,
                })
            }
            Channel::Sms => Ok(Rendered::Sms {
                text: self
                    .part(event_type, "sms", locale, ctx)?
                    .ok_or_else(missing)?
                    .trim()
                    .to_owned(),
            }),
            Channel::Push => {
                let title = self.part(event_type, "push.title", locale, ctx)?;
                let body = self.part(event_type, "push.body", locale, ctx)?;
                if title.is_none() && body.is_none() {
                    return Err(missing());
                }
                Ok(Rendered::Push {
                    title: title.unwrap_or_default().trim().to_owned(),
                    body: body.unwrap_or_default().trim().to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Templates {
        let mut t = Templates::empty();
        t.add("welcome", "email.subject", None, "Hi {{user.first_name}}")
            .expect("ok");
        t.add(
            "welcome",
            "email.subject",
            Some("pt"),
            "Olá {{user.first_name}}",
        )
        .expect("ok");
        t.add("welcome", "email.html", None, "<p>{{payload.note}}</p>")
            .expect("ok");
        t.add("welcome", "email.txt", None, "{{payload.note}}")
            .expect("ok");
        t
    }

    #[test]
    fn locale_falls_back_from_region_to_language_to_default() {
        let t = sample();
        let ctx = json!({"user": {"first_name": "Ana"}, "payload": {"note": "x"}});
        let subject = |l| match t.render("welcome", Channel::Email, l, &ctx) {
            Ok(Rendered::Email { subject, .. }) => subject,
            other => panic!("{other:?}"),
        };
        assert_eq!(subject(Some("pt-BR")), "Olá Ana");
        assert_eq!(subject(Some("de-DE")), "Hi Ana");
        assert_eq!(subject(None), "Hi Ana");
    }

    #[test]
    fn html_is_escaped_and_text_is_not() {
        let t = sample();
        let ctx = json!({"user": {"first_name": "A"}, "payload": {"note": "<b>&</b>"}});
        let Ok(Rendered::Email { html, text, .. }) =
            t.render("welcome", Channel::Email, None, &ctx)
        else {
            panic!("renders")
        };
        assert_eq!(html.as_deref(), Some("<p>&lt;b&gt;&amp;&lt;/b&gt;</p>"));
        assert_eq!(text.as_deref(), Some("<b>&</b>"));
    }

    #[test]
    fn a_missing_variable_is_an_error_not_a_blank() {
        let t = sample();
        let err = t
            .render(
                "welcome",
                Channel::Email,
                None,
                &json!({"user": {}, "payload": {"note": "x"}}),
            )
            .expect_err("strict");
        assert_eq!(err.reason(), "template_error");
    }

    #[test]
    fn an_unknown_event_type_or_channel_is_missing() {
        let t = sample();
        let err = t
            .render("nope", Channel::Email, None, &json!({}))
            .expect_err("missing");
        assert_eq!(err.reason(), "template_missing");
        assert_eq!(t.channels_for("welcome"), vec![Channel::Email]);
        assert!(t.channels_for("nope").is_empty());
    }
}
