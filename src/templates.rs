//! Handlebars templates: files `templates/<event_type>/<part>[.<locale>].hbs`, overridden through the API; strict.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use handlebars::Handlebars;
use serde_json::Value;

use crate::domain::Channel;

/// The parts a channel's message is made of. HTML parts are escaped; the rest are not.
const PARTS: [&str; 12] = [
    "email.subject",
    "email.html",
    "email.txt",
    "push.title",
    "push.body",
    "push.data",
    "sms",
    "webhook",
    "in_app.title",
    "in_app.body",
    "in_app.url",
    "in_app.data",
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
    /// An inbox item.
    InApp {
        title: String,
        body: String,
        /// Where clicking the item leads: an absolute `http(s)` URL.
        url: Option<String>,
        /// A JSON object for the customer's own front end (`in_app.data`).
        data: Option<serde_json::Map<String, Value>>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
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
    } else if part.starts_with("in_app.") {
        Channel::InApp
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
    /// Every registered name, with its `{{#each}}` depth.
    names: HashMap<String, usize>,
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

/// `{{#each}}` blocks nest at most this deep.
pub const MAX_EACH_DEPTH: usize = 3;
/// A render may iterate at most this many times in all (the longest array or object in
/// its data, to the power of the template's `{{#each}}` depth).
pub const MAX_ITERATIONS: u64 = 100_000;
/// A rendered part is at most this long.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// An inbox item's parts are at most this long (bytes): it is shown in a list, and
/// sent whole to every socket of its user.
pub const IN_APP_TITLE_MAX: usize = 1024;
pub const IN_APP_BODY_MAX: usize = 16 * 1024;
pub const IN_APP_URL_MAX: usize = 2048;
pub const IN_APP_DATA_MAX: usize = 16 * 1024;

/// Checks that a template compiles and stays within what herald renders: no partials or
/// decorators (a template could include itself), `{{#each}}` nested at most
/// [`MAX_EACH_DEPTH`] deep. Templates come through the API, so they are untrusted.
pub fn compile(source: &str) -> Result<handlebars::Template, CompileError> {
    checked(source).map(|(t, _)| t)
}

/// [`compile`], also returning the template's `{{#each}}` depth.
fn checked(source: &str) -> Result<(handlebars::Template, usize), CompileError> {
    let t = handlebars::Template::compile(source).map_err(|e| CompileError {
        line: e.pos().map(|p| p.0),
        column: e.pos().map(|p| p.1),
        reason: e.reason().to_string(),
    })?;
    let depth = each_depth(&t).map_err(|reason| CompileError {
        line: None,
        column: None,
        reason,
    })?;
    if depth > MAX_EACH_DEPTH {
        return Err(CompileError {
            line: None,
            column: None,
            reason: format!("{{{{#each}}}} blocks nest {depth} deep; at most {MAX_EACH_DEPTH}"),
        });
    }
    Ok((t, depth))
}

/// How deep `{{#each}}` blocks nest; partials and decorators are refused.
fn each_depth(t: &handlebars::Template) -> Result<usize, String> {
    use handlebars::template::{Parameter, TemplateElement as E};
    let mut deepest = 0;
    for e in &t.elements {
        let d = match e {
            E::HelperBlock(h) => {
                let inner = [&h.template, &h.inverse]
                    .into_iter()
                    .flatten()
                    .map(each_depth)
                    .try_fold(0, |a, d| d.map(|d| a.max(d)))?;
                let is_each = matches!(&h.name, Parameter::Name(n) if n == "each");
                inner + usize::from(is_each)
            }
            E::PartialExpression(_) | E::PartialBlock(_) => {
                return Err("partials (`{{> name}}`) are not supported".into())
            }
            E::DecoratorExpression(_) | E::DecoratorBlock(_) => {
                return Err("decorators (`{{* name}}`) are not supported".into())
            }
            _ => 0,
        };
        deepest = deepest.max(d);
    }
    Ok(deepest)
}

/// The longest array or object anywhere in `v` (what one `{{#each}}` can iterate).
fn widest(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a.iter().map(widest).fold(a.len() as u64, u64::max),
        Value::Object(o) => o.values().map(widest).fold(o.len() as u64, u64::max),
        _ => 0,
    }
}

/// A writer that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT_BYTES {
            return Err(std::io::Error::other(format!(
                "the output would exceed {MAX_OUTPUT_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Registry {
    fn build(parts: Vec<PartSource>) -> anyhow::Result<Self> {
        let mut escaped = Handlebars::new();
        escaped.set_strict_mode(true);
        let mut plain = Handlebars::new();
        plain.set_strict_mode(true);
        plain.register_escape_fn(handlebars::no_escape);
        let mut names = HashMap::new();
        for p in &parts {
            let name = key(&p.event_type, p.part, p.locale.as_deref());
            let (compiled, depth) = checked(&p.source).map_err(|e| {
                anyhow::anyhow!("template {}/{} ({:?}): {e}", p.event_type, p.part, p.origin)
            })?;
            if p.part.ends_with(".html") {
                escaped.register_template(&name, compiled);
            } else {
                plain.register_template(&name, compiled);
            }
            names.insert(name, depth);
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
        self.registry().names.keys().any(|n| n.starts_with(&prefix))
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
                Channel::InApp => {
                    self.has(event_type, "in_app.title") || self.has(event_type, "in_app.body")
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
        let current = self.registry();
        for l in locale_chain(locale) {
            let name = key(event_type, part, l);
            let Some(&depth) = current.names.get(&name) else {
                continue;
            };
            let failed = |reason: String| TemplateError::Render {
                name: format!("{event_type}/{part}"),
                reason,
            };
            let iterations = widest(ctx).saturating_pow(depth as u32);
            if depth > 0 && iterations > MAX_ITERATIONS {
                return Err(failed(format!(
                    "its {{{{#each}}}} blocks could iterate {iterations} times over this data; at most {MAX_ITERATIONS}"
                )));
            }
            let registry = if part.ends_with(".html") {
                &current.escaped
            } else {
                &current.plain
            };
            let mut out = Bounded(Vec::new());
            registry
                .render_to_write(&name, ctx, &mut out)
                .map_err(|e| failed(e.to_string()))?;
            return String::from_utf8(out.0)
                .map(Some)
                .map_err(|e| failed(e.to_string()));
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
            Channel::InApp => {
                let title = self.part(event_type, "in_app.title", locale, ctx)?;
                let body = self.part(event_type, "in_app.body", locale, ctx)?;
                if title.is_none() && body.is_none() {
                    return Err(missing());
                }
                let failed = |part: &str, reason: String| TemplateError::Render {
                    name: format!("{event_type}/{part}"),
                    reason,
                };
                let url = match self.part(event_type, "in_app.url", locale, ctx)? {
                    Some(raw) if !raw.trim().is_empty() => {
                        let raw = raw.trim();
                        match url::Url::parse(raw) {
                            Ok(u) if matches!(u.scheme(), "http" | "https") => Some(raw.to_owned()),
                            _ => {
                                return Err(failed(
                                    "in_app.url",
                                    "in_app.url must render an absolute http(s) URL".to_owned(),
                                ))
                            }
                        }
                    }
                    _ => None,
                };
                let data = match self.part(event_type, "in_app.data", locale, ctx)? {
                    None => None,
                    Some(raw) => match serde_json::from_str::<Value>(&raw) {
                        Ok(Value::Object(m)) => Some(m),
                        _ => {
                            return Err(failed(
                                "in_app.data",
                                "in_app.data must render a JSON object".to_owned(),
                            ))
                        }
                    },
                };
                let (title, body) = (
                    title.unwrap_or_default().trim().to_owned(),
                    body.unwrap_or_default().trim().to_owned(),
                );
                let data_len = data
                    .as_ref()
                    .map_or(0, |d| Value::Object(d.clone()).to_string().len());
                for (part, len, max) in [
                    ("in_app.title", title.len(), IN_APP_TITLE_MAX),
                    ("in_app.body", body.len(), IN_APP_BODY_MAX),
                    (
                        "in_app.url",
                        url.as_ref().map_or(0, String::len),
                        IN_APP_URL_MAX,
                    ),
                    ("in_app.data", data_len, IN_APP_DATA_MAX),
                ] {
                    if len > max {
                        return Err(failed(
                            part,
                            format!(
                                "{part} rendered {len} bytes; an inbox item takes at most {max}"
                            ),
                        ));
                    }
                }
                Ok(Rendered::InApp {
                    title,
                    body,
                    url,
                    data,
                })
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
    fn an_in_app_item_renders_its_parts_and_refuses_a_bad_link_data_or_size() {
        let item = |url: &str, data: &str| {
            let p = |part, src: &str| PartSource {
                event_type: "note".into(),
                part,
                locale: None,
                source: src.into(),
                origin: Origin::File,
            };
            Templates::from_parts(vec![
                p("in_app.title", "Hi {{user.first_name}}"),
                p("in_app.body", "{{payload.text}}"),
                p("in_app.url", url),
                p("in_app.data", data),
            ])
            .expect("compiles")
        };
        let ctx = |text: &str| json!({"user": {"first_name": "Ana"}, "payload": {"text": text}});
        let good = item("https://example.com/x", r#"{"n": 1}"#);
        assert_eq!(good.channels_for("note"), vec![Channel::InApp]);
        assert_eq!(
            good.render("note", Channel::InApp, None, &ctx("body")),
            Ok(Rendered::InApp {
                title: "Hi Ana".into(),
                body: "body".into(),
                url: Some("https://example.com/x".into()),
                data: json!({"n": 1}).as_object().cloned(),
            })
        );
        for (t, why) in [
            (
                item("javascript:alert(1)", "{}"),
                "a link that is not http(s)",
            ),
            (item("/relative", "{}"), "a relative link"),
            (
                item("https://example.com", "[1]"),
                "data that is not an object",
            ),
        ] {
            let e = t
                .render("note", Channel::InApp, None, &ctx("b"))
                .expect_err(why);
            assert_eq!(e.reason(), "template_error", "{why}");
        }
        let long = "x".repeat(IN_APP_BODY_MAX + 1);
        let e = good
            .render("note", Channel::InApp, None, &ctx(&long))
            .expect_err("a body over the item's limit");
        assert!(e.to_string().contains("in_app.body"), "{e}");
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

/// Properties over arbitrary (untrusted) templates and data: compiling and rendering never
/// panic, and a rendered part never exceeds [`MAX_OUTPUT_BYTES`].
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::{Channel, Origin, PartSource, Rendered, Templates, MAX_OUTPUT_BYTES};

    fn source() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[a-z <>&\"]{0,8}",
            Just("{{payload.a}}".to_owned()),
            Just("{{{payload.a}}}".to_owned()),
            Just("{{#each payload.list}}".to_owned()),
            Just("{{/each}}".to_owned()),
            Just("{{#if payload.a}}".to_owned()),
            Just("{{else}}".to_owned()),
            Just("{{/if}}".to_owned()),
            Just("{{this}}".to_owned()),
            Just("{{@index}}".to_owned()),
            Just("{{> other}}".to_owned()),
            Just("{{".to_owned()),
            Just("}}".to_owned()),
            Just("{{lookup payload.list 0}}".to_owned()),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
    }

    proptest! {
        #[test]
        fn untrusted_templates_compile_or_refuse_and_render_bounded(
            src in source(),
            a in ".{0,200}",
            list in prop::collection::vec(".{0,50}", 0..64),
        ) {
            let part = |part: &'static str| PartSource {
                event_type: "fuzz".into(),
                part,
                locale: None,
                source: src.clone(),
                origin: Origin::Api,
            };
            let Ok(t) = Templates::from_parts(vec![part("email.subject"), part("email.html")]) else {
                return Ok(());
            };
            let ctx = json!({"payload": {"a": a, "list": list}, "user": {}});
            if let Ok(Rendered::Email { subject, html, .. }) = t.render("fuzz", Channel::Email, None, &ctx) {
                prop_assert!(subject.len() <= MAX_OUTPUT_BYTES);
                prop_assert!(html.map_or(0, |h| h.len()) <= MAX_OUTPUT_BYTES);
            }
        }
    }
}

#[cfg(test)]
mod bounds {
    use serde_json::json;

    use super::{compile, Channel, Origin, PartSource, TemplateError, Templates};

    /// An email whose subject is `source` (and whose text is fixed).
    fn subject_only(source: &str) -> Templates {
        let part = |part, source: &str| PartSource {
            event_type: "t".into(),
            part,
            locale: None,
            source: source.into(),
            origin: Origin::Api,
        };
        Templates::from_parts(vec![part("email.subject", source), part("email.txt", "x")])
            .expect("compiles")
    }

    fn render_error(t: &Templates, ctx: serde_json::Value) -> String {
        match t.render("t", Channel::Email, None, &ctx) {
            Err(e @ TemplateError::Render { .. }) => {
                assert_eq!(e.reason(), "template_error");
                e.to_string()
            }
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn partials_decorators_and_deep_loops_are_refused_when_saved() {
        let partial = compile("hi {{> welcome}}").expect_err("partial");
        assert!(partial.reason.contains("partials"), "{partial}");
        let decorator = compile("{{*inline}}").expect_err("decorator");
        assert!(decorator.reason.contains("decorators"), "{decorator}");
        let deep =
            "{{#each a}}{{#each b}}{{#each c}}{{#each d}}x{{/each}}{{/each}}{{/each}}{{/each}}";
        assert!(compile(deep)
            .expect_err("too deep")
            .reason
            .contains("nest 4 deep"));
        let ok = "{{#each a}}{{#if b}}{{#each c}}{{#each d}}x{{/each}}{{/each}}{{/if}}{{/each}}";
        compile(ok).expect("three deep is allowed");
    }

    #[test]
    fn nested_loops_over_wide_data_are_refused_before_rendering() {
        let t = subject_only("{{#each payload.a}}{{#each ../payload.a}}{{/each}}{{/each}}");
        let wide: Vec<u32> = (0..1_000).collect();
        let why = render_error(&t, json!({"payload": {"a": wide}}));
        assert!(why.contains("1000000 times"), "{why}");
        let narrow: Vec<u32> = (0..100).collect();
        t.render(
            "t",
            Channel::Email,
            None,
            &json!({"payload": {"a": narrow}}),
        )
        .expect("10,000 iterations render");
    }

    #[test]
    fn output_past_the_bound_is_an_error_not_a_huge_message() {
        let t = subject_only("{{#each payload.list}}{{../payload.big}}{{/each}}");
        let big = "x".repeat(100_000);
        let why = render_error(&t, json!({"payload": {"big": big, "list": vec![1; 20]}}));
        assert!(why.contains("exceed"), "{why}");
    }
}
