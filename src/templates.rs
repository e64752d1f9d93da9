//! Handlebars templates: files `templates/<event_type>/<part>[.<locale>].hbs`, overridden through the API; strict.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use handlebars::Handlebars;
use serde_json::Value;

use crate::domain::Channel;

/// The parts a channel's message is made of. HTML parts are escaped; the rest are not.
const PARTS: [&str; 8] = [
    "email.subject",
    "email.html",
    "email.txt",
    "push.title",
    "push.body",
    "push.data",
    "sms",
    "webhook",
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
        /// Key/value data for the app (`push.data` renders a JSON object; values become strings).
        data: BTreeMap<String, String>,
    },
    /// A JSON document.
    Webhook {
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

/// Where a template part came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    File,
    /// Stored in MongoDB through the API; overrides the files of its event type,
    /// channel and locale.
    Api,
}

/// One template part's source.
#[derive(Debug, Clone)]
pub struct PartSource {
    pub event_type: String,
    pub part: &'static str,
    pub locale: Option<String>,
    pub source: String,
    pub origin: Origin,
}

impl PartSource {
    pub fn channel(&self) -> Channel {
        channel_of(self.part)
    }
}

/// The channel a part belongs to.
pub fn channel_of(part: &str) -> Channel {
    if part.starts_with("email.") {
        Channel::Email
    } else if part.starts_with("push.") {
        Channel::Push
    } else if part == "webhook" {
        Channel::Webhook
    } else {
        Channel::Sms
    }
}

/// The known part name equal to `name`, if any.
pub fn part_name(name: &str) -> Option<&'static str> {
    PARTS.iter().copied().find(|p| *p == name)
}

/// Compiled templates.
struct Registry {
    escaped: Handlebars<'static>,
    plain: Handlebars<'static>,
    names: HashSet<String>,
    parts: Vec<PartSource>,
}

/// A template that does not compile, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", .line.map(|l| format!("line {l}, column {}: ", .column.unwrap_or(0))).unwrap_or_default())]
pub struct CompileError {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

/// Checks that a template compiles.
pub fn compile(source: &str) -> Result<handlebars::Template, CompileError> {
    handlebars::Template::compile(source).map_err(|e| CompileError {
        line: e.pos().map(|p| p.0),
        column: e.pos().map(|p| p.1),
        reason: e.reason().to_string(),
    })
}

impl Registry {
    fn build(parts: Vec<PartSource>) -> anyhow::Result<Self> {
        let mut escaped = Handlebars::new();
        escaped.set_strict_mode(true);
        let mut plain = Handlebars::new();
        plain.set_strict_mode(true);
        plain.register_escape_fn(handlebars::no_escape);
        let mut names = HashSet::new();
        for p in &parts {
            let name = key(&p.event_type, p.part, p.locale.as_deref());
            let compiled = compile(&p.source).map_err(|e| {
                anyhow::anyhow!("template {}/{} ({:?}): {e}", p.event_type, p.part, p.origin)
            })?;
            if p.part.ends_with(".html") {
                escaped.register_template(&name, compiled);
            } else {
                plain.register_template(&name, compiled);
            }
            names.insert(name);
        }
        Ok(Self {
            escaped,
            plain,
            names,
            parts,
        })
    }
}

/// Every template: the files read at start, overridden by the ones stored through the
/// API (refreshed while running, so every process follows the API's changes).
pub struct Templates {
    files: Vec<PartSource>,
    current: RwLock<Arc<Registry>>,
}

fn key(event_type: &str, part: &str, locale: Option<&str>) -> String {
    format!("{event_type}/{part}/{}", locale.unwrap_or("_"))
}

/// A language tag such as `pt` or `pt-BR`.
pub fn valid_locale(s: &str) -> bool {
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
    /// Compiles `files` (no stored overrides yet).
    pub fn from_parts(files: Vec<PartSource>) -> anyhow::Result<Self> {
        let registry = Registry::build(files.clone())?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(registry)),
        })
    }

    /// Reads every template under `dir`; a template that does not compile stops the
    /// start with its path. A missing directory means no file templates.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        let Ok(types) = std::fs::read_dir(dir) else {
            tracing::warn!(dir = %dir.display(), "no templates directory");
            return Self::from_parts(files);
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
                            .map(|l| (*part, Some(l.to_owned())))
                    }
                });
                let Some((part, locale)) = parsed else {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not <part>[.<locale>].hbs");
                    continue;
                };
                let source = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                compile(&source).with_context(|| format!("compiling {}", path.display()))?;
                files.push(PartSource {
                    event_type: event_type.clone(),
                    part,
                    locale,
                    source,
                    origin: Origin::File,
                });
            }
        }
        tracing::info!(count = files.len(), dir = %dir.display(), "templates loaded");
        Self::from_parts(files)
    }

    /// Rebuilds with the stored overrides: a stored (event type, channel, locale)
    /// replaces every file part of the same three.
    pub fn apply_overrides(&self, stored: Vec<PartSource>) -> anyhow::Result<()> {
        let overridden: HashSet<(String, Channel, Option<String>)> = stored
            .iter()
            .map(|p| (p.event_type.clone(), p.channel(), p.locale.clone()))
            .collect();
        let mut parts: Vec<PartSource> = self
            .files
            .iter()
            .filter(|p| {
                !overridden.contains(&(p.event_type.clone(), p.channel(), p.locale.clone()))
            })
            .cloned()
            .collect();
        parts.extend(stored);
        let registry = Registry::build(parts)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(registry);
        Ok(())
    }

    fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every part in use, with its origin.
    pub fn parts(&self) -> Vec<PartSource> {
        self.registry().parts.clone()
    }

    fn has(&self, event_type: &str, part: &str) -> bool {
        let prefix = format!("{event_type}/{part}/");
        self.registry().names.iter().any(|n| n.starts_with(&prefix))
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
                Channel::Webhook => self.has(event_type, "webhook"),
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
        let current = self.registry();
        for l in locale_chain(locale) {
            let name = key(event_type, part, l);
            if !current.names.contains(&name) {
                continue;
            }
            let registry = if part.ends_with(".html") {
                &current.escaped
            } else {
                &current.plain
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
                let data = match self.part(event_type, "push.data", locale, ctx)? {
                    None => BTreeMap::new(),
                    Some(raw) => match serde_json::from_str::<Value>(&raw) {
                        Ok(Value::Object(m)) => m
                            .into_iter()
                            .map(|(k, v)| {
                                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                                (k, text)
                            })
                            .collect(),
                        _ => {
                            return Err(TemplateError::Render {
                                name: format!("{event_type}/push.data"),
                                reason: "push.data must render a JSON object".to_owned(),
                            })
                        }
                    },
                };
                Ok(Rendered::Push {
                    title: title.unwrap_or_default().trim().to_owned(),
                    body: body.unwrap_or_default().trim().to_owned(),
                    data,
                })
            }
            Channel::Webhook => {
                let body = self
                    .part(event_type, "webhook", locale, ctx)?
                    .ok_or_else(missing)?;
                serde_json::from_str::<Value>(&body).map_err(|e| TemplateError::Render {
                    name: format!("{event_type}/webhook"),
                    reason: format!("the rendered body is not JSON: {e}"),
                })?;
                Ok(Rendered::Webhook { body })
            }
        }
    }
}

/// How many SMS segments a text takes: GSM-7 fits 160 characters (153 per part when
/// split); anything outside GSM-7 is sent as UCS-2, 70 (67 per part).
pub fn sms_segments(text: &str) -> usize {
    const GSM7: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const GSM7_EXT: &str = "^{}\\[~]|€";
    let mut units = 0usize;
    let mut gsm = true;
    for c in text.chars() {
        if GSM7.contains(c) {
            units += 1;
        } else if GSM7_EXT.contains(c) {
            units += 2;
        } else {
            gsm = false;
            break;
        }
    }
    let (single, part, len) = if gsm {
        (160, 153, units)
    } else {
        (70, 67, text.encode_utf16().count())
    };
    if len <= single {
        1
    } else {
        len.div_ceil(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn part(part: &'static str, locale: Option<&str>, source: &str) -> PartSource {
        PartSource {
            event_type: "welcome".into(),
            part,
            locale: locale.map(str::to_owned),
            source: source.into(),
            origin: Origin::File,
        }
    }

    fn sample() -> Templates {
        Templates::from_parts(vec![
            part("email.subject", None, "Hi {{user.first_name}}"),
            part("email.subject", Some("pt"), "Olá {{user.first_name}}"),
            part("email.html", None, "<p>{{payload.note}}</p>"),
            part("email.txt", None, "{{payload.note}}"),
        ])
        .expect("compiles")
    }

    #[test]
    fn a_stored_override_replaces_the_files_of_its_channel_and_locale() {
        let t = sample();
        let mut stored = part("email.subject", None, "Stored {{user.first_name}}");
        stored.origin = Origin::Api;
        let mut html = part("email.html", None, "<i>stored</i>");
        html.origin = Origin::Api;
        t.apply_overrides(vec![stored, html]).expect("applies");
        let ctx = json!({"user": {"first_name": "Ana"}, "payload": {"note": "x"}});
        let Ok(Rendered::Email {
            subject,
            html,
            text,
        }) = t.render("welcome", Channel::Email, None, &ctx)
        else {
            panic!("renders")
        };
        assert_eq!(subject, "Stored Ana");
        assert_eq!(html.as_deref(), Some("<i>stored</i>"));
        assert_eq!(
            text, None,
            "the file's text part of the same locale is replaced too"
        );
        let Ok(Rendered::Email { subject, .. }) =
            t.render("welcome", Channel::Email, Some("pt"), &ctx)
        else {
            panic!("renders")
        };
        assert_eq!(subject, "Olá Ana", "other locales keep their files");
    }

    #[test]
    fn sms_segments_follow_gsm7_and_ucs2() {
        assert_eq!(sms_segments(&"a".repeat(160)), 1);
        assert_eq!(sms_segments(&"a".repeat(161)), 2);
        assert_eq!(
            sms_segments(&"€".repeat(80)),
            1,
            "extension characters count twice"
        );
        assert_eq!(sms_segments(&"ã".repeat(70)), 1);
        assert_eq!(sms_segments(&"ã".repeat(71)), 2);
    }

    #[test]
    fn compile_errors_say_where() {
        let e = compile("line one\n{{#if x}} never closed").expect_err("invalid");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().starts_with("line 2, column"), "{e}");
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
