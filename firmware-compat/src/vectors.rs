//! The firmware wire contract as data: JSON files of request/expectation steps, and the runner
//! that replays them against a server.
//!
//! A vector is `{ "name", "description", "steps": [...] }`. A step is either an HTTP exchange
//! (`request`, `expect`, optional `capture`) or an operator command (`admin`, optional
//! `expect` on its JSON output, optional `capture`). `{{name}}` in any string is replaced by a
//! variable: a built-in (`run`, `mac_prefix`) or one captured by an earlier step. A filter may
//! follow the name: `{{mac_prefix|lower}}`, `|upper`, `|dashes` (`:` → `-`), `|bare` (no `:` or
//! `-`), `|url` (percent-encoded). A string that is exactly one `{{name}}` takes the variable's JSON value, so a captured
//! number stays a number.
//!
//! Expected bodies are shapes (see [`match_shape`]).

use std::{
    collections::BTreeMap,
    fmt,
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::client::{Client, Response};

/// Where the crate's own vectors live.
pub const VECTORS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors");

/// How long one HTTP exchange of a vector may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// One scenario of the wire contract.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vector {
    pub name: String,
    pub description: String,
    pub steps: Vec<Step>,
    /// The file the vector was loaded from (file name only).
    #[serde(skip)]
    pub file: String,
}

/// One step: an HTTP exchange or an operator command.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawStep")]
pub struct Step {
    /// Free text shown in failure messages.
    pub note: Option<String>,
    pub action: Action,
    pub expect: Expect,
    /// Variable name → dotted path into the JSON answer (`token`, `commands.0.id`).
    pub capture: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Http(Request),
    /// Arguments to the `ozone` binary, after its global options.
    Admin(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Body,
}

#[derive(Debug, Clone)]
pub enum Body {
    None,
    /// Sent as `application/json` unless the step sets `Content-Type`.
    Json(Value),
    /// An urlencoded string, sent as `application/x-www-form-urlencoded` unless the step sets
    /// `Content-Type`.
    Form(String),
    /// Sent as is, repeated `repeat` times (for oversize bodies), with no `Content-Type` unless
    /// the step sets one.
    Raw {
        text: String,
        repeat: usize,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Required for HTTP steps; not allowed for admin steps.
    pub status: Option<u16>,
    /// Shape of the JSON body (HTTP) or of the command's JSON output (admin).
    pub body: Option<Value>,
    /// Response header name → expected value (literal or placeholder).
    #[serde(default)]
    pub headers: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    note: Option<String>,
    request: Option<RawRequest>,
    admin: Option<Vec<String>>,
    expect: Option<Expect>,
    #[serde(default)]
    capture: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    json: Option<Value>,
    form: Option<String>,
    raw: Option<String>,
    repeat: Option<usize>,
}

impl TryFrom<RawStep> for Step {
    type Error = String;

    fn try_from(raw: RawStep) -> Result<Step, String> {
        let expect = raw.expect.unwrap_or_default();
        let action = match (raw.request, raw.admin) {
            (Some(r), None) => {
                if expect.status.is_none() {
                    return Err("an HTTP step needs `expect.status`".into());
                }
                if r.repeat.is_some() && r.raw.is_none() {
                    return Err("`repeat` applies to a `raw` body only".into());
                }
                let body = match (r.json, r.form, r.raw) {
                    (None, None, None) => Body::None,
                    (Some(j), None, None) => Body::Json(j),
                    (None, Some(f), None) => Body::Form(f),
                    (None, None, Some(text)) => Body::Raw {
                        text,
                        repeat: r.repeat.unwrap_or(1),
                    },
                    _ => return Err("a request has at most one of `json`, `form`, `raw`".into()),
                };
                Action::Http(Request {
                    method: r.method,
                    path: r.path,
                    headers: r.headers,
                    body,
                })
            }
            (None, Some(args)) => {
                if expect.status.is_some() || !expect.headers.is_empty() {
                    return Err("an admin step can only expect a `body`".into());
                }
                if args.is_empty() {
                    return Err("`admin` needs at least one argument".into());
                }
                Action::Admin(args)
            }
            _ => return Err("a step has exactly one of `request` and `admin`".into()),
        };
        Ok(Step {
            note: raw.note,
            action,
            expect,
            capture: raw.capture,
        })
    }
}

/// Loads every `*.json` vector in `dir`, sorted by file name.
pub fn load_vectors(dir: &Path) -> anyhow::Result<Vec<Vector>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("reading vectors in {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut vectors = Vec::with_capacity(files.len());
    for path in files {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut vector: Vector = serde_json::from_str(&text)
            .with_context(|| format!("parsing vector {}", path.display()))?;
        vector.file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if vector.name.trim().is_empty() || vector.steps.is_empty() {
            bail!(
                "vector {} needs a name and at least one step",
                path.display()
            );
        }
        vectors.push(vector);
    }
    Ok(vectors)
}

impl Vector {
    /// Whether the vector runs operator commands (and so needs the `ozone` CLI).
    pub fn needs_admin(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.action, Action::Admin(_)))
    }

    /// Replays the vector against a server. `admin` runs one operator command (the arguments
    /// after `ozone`) and returns its standard output.
    pub async fn replay(
        &self,
        addr: SocketAddr,
        admin: &mut (dyn FnMut(&[String]) -> anyhow::Result<String> + Send),
    ) -> anyhow::Result<()> {
        let mut vars = builtin_vars();
        let mut client = Client::new(addr);
        let total = self.steps.len();
        for (i, step) in self.steps.iter().enumerate() {
            let outcome = match &step.action {
                Action::Http(request) => run_http(&mut client, request, step, &mut vars).await,
                Action::Admin(args) => run_admin(admin, args, step, &mut vars),
            };
            if let Err(err) = outcome {
                let shown = |s: &String| substitute(s, &vars).unwrap_or_else(|_| s.clone());
                let what = match &step.action {
                    Action::Http(r) => format!("{} {}", r.method, shown(&r.path)),
                    Action::Admin(args) => {
                        let args: Vec<String> = args.iter().map(shown).collect();
                        format!("ozone {}", args.join(" "))
                    }
                };
                let note = step
                    .note
                    .as_deref()
                    .map(|n| format!(" \"{n}\""))
                    .unwrap_or_default();
                bail!(
                    "vector `{}` ({}), step {}/{total}{note} [{what}]: {err:#}",
                    self.name,
                    self.file,
                    i + 1
                );
            }
        }
        Ok(())
    }
}

async fn run_http(
    client: &mut Client,
    request: &Request,
    step: &Step,
    vars: &mut Vars,
) -> anyhow::Result<()> {
    let path = substitute(&request.path, vars)?;
    let mut headers: Vec<(String, String)> = Vec::with_capacity(request.headers.len() + 1);
    for (name, value) in &request.headers {
        headers.push((name.clone(), substitute(value, vars)?));
    }
    let has_content_type = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
    let body: Vec<u8> = match &request.body {
        Body::None => Vec::new(),
        Body::Json(v) => {
            if !has_content_type {
                headers.push(("Content-Type".into(), "application/json".into()));
            }
            serde_json::to_vec(&substitute_value(v, vars)?)?
        }
        Body::Form(f) => {
            if !has_content_type {
                headers.push((
                    "Content-Type".into(),
                    "application/x-www-form-urlencoded".into(),
                ));
            }
            substitute(f, vars)?.into_bytes()
        }
        Body::Raw { text, repeat } => substitute(text, vars)?.repeat(*repeat).into_bytes(),
    };
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let response = tokio::time::timeout(
        STEP_TIMEOUT,
        client.send(&request.method, &path, &header_refs, &body),
    )
    .await
    .map_err(|_| anyhow!("no response within {STEP_TIMEOUT:?}"))?
    .context("request failed")?;

    check_response(&response, step, vars)
}

fn check_response(response: &Response, step: &Step, vars: &mut Vars) -> anyhow::Result<()> {
    let json: Option<Value> = serde_json::from_slice(&response.body).ok();
    let shown = || {
        let text = response.text();
        let text = truncated(&text, 2000);
        format!("response {}: {text}", response.status)
    };
    if let Some(status) = step.expect.status {
        if response.status != status {
            bail!(
                "status: expected {status}, got {}; {}",
                response.status,
                shown()
            );
        }
    }
    for (name, expected) in &step.expect.headers {
        let expected = substitute_value(expected, vars)?;
        let Some(got) = response.header(name) else {
            bail!(
                "header `{name}`: expected {expected}, got none; {}",
                shown()
            );
        };
        if let Err(m) = match_shape(&expected, &Value::String(got.to_owned())) {
            bail!("header `{name}`: {m}");
        }
    }
    if let Some(expected) = &step.expect.body {
        let expected = substitute_value(expected, vars)?;
        let Some(got) = &json else {
            bail!("body: expected JSON {expected}, got non-JSON; {}", shown());
        };
        if let Err(m) = match_shape(&expected, got) {
            bail!("{m}; {}", shown());
        }
    }
    if !step.capture.is_empty() {
        let Some(got) = &json else {
            bail!("capture: the response is not JSON; {}", shown());
        };
        capture(&step.capture, got, vars).with_context(shown)?;
    }
    Ok(())
}

fn run_admin(
    admin: &mut (dyn FnMut(&[String]) -> anyhow::Result<String> + Send),
    args: &[String],
    step: &Step,
    vars: &mut Vars,
) -> anyhow::Result<()> {
    let args = args
        .iter()
        .map(|a| substitute(a, vars))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let stdout = admin(&args).context("operator command failed")?;
    if step.expect.body.is_none() && step.capture.is_empty() {
        return Ok(());
    }
    // The operator commands print one JSON document on the last line.
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let json: Value = serde_json::from_str(last)
        .with_context(|| format!("the command's output is not JSON: {stdout}"))?;
    if let Some(expected) = &step.expect.body {
        let expected = substitute_value(expected, vars)?;
        if let Err(m) = match_shape(&expected, &json) {
            bail!("output {m}; output: {last}");
        }
    }
    capture(&step.capture, &json, vars).with_context(|| format!("output: {last}"))
}

type Vars = BTreeMap<String, Value>;

/// `run`: 8 random hex digits, fresh for each replay; `mac_prefix`: `02:` and the same four
/// bytes in upper case with colons (a locally administered MAC prefix, so replays never touch a
/// real device and repeated replays on one database do not collide).
fn builtin_vars() -> Vars {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    let bytes = (h.finish() as u32).to_be_bytes();
    let run: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mac_prefix = std::iter::once("02".to_owned())
        .chain(bytes.iter().map(|b| format!("{b:02X}")))
        .collect::<Vec<_>>()
        .join(":");
    let mut vars = Vars::new();
    vars.insert("run".into(), Value::String(run));
    vars.insert("mac_prefix".into(), Value::String(mac_prefix));
    vars
}

fn capture(spec: &BTreeMap<String, String>, from: &Value, vars: &mut Vars) -> anyhow::Result<()> {
    for (var, path) in spec {
        let mut at = from;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let next = match at {
                Value::Object(map) => map.get(part),
                Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            at = next.ok_or_else(|| anyhow!("capture `{var}`: `{path}` is not in the answer"))?;
        }
        vars.insert(var.clone(), at.clone());
    }
    Ok(())
}

fn render(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn apply_filter(value: String, filter: &str) -> anyhow::Result<String> {
    Ok(match filter {
        "lower" => value.to_ascii_lowercase(),
        "upper" => value.to_ascii_uppercase(),
        "dashes" => value.replace(':', "-"),
        "bare" => value.replace([':', '-'], ""),
        "url" => percent_encode(&value),
        other => bail!("unknown filter `{other}` (lower, upper, dashes, bare, url)"),
    })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Evaluates the inside of `{{...}}`: a variable and optional `|filter`s.
fn lookup(expr: &str, vars: &Vars) -> anyhow::Result<Value> {
    let mut parts = expr.split('|').map(str::trim);
    let name = parts.next().unwrap_or_default();
    let value = vars
        .get(name)
        .ok_or_else(|| anyhow!("unknown variable `{{{{{name}}}}}`"))?;
    let mut filters = parts.peekable();
    if filters.peek().is_none() {
        return Ok(value.clone());
    }
    let mut s = render(value);
    for f in filters {
        s = apply_filter(s, f)?;
    }
    Ok(Value::String(s))
}

/// Replaces every `{{expr}}` in `s`.
fn substitute(s: &str, vars: &Vars) -> anyhow::Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| anyhow!("unterminated `{{{{` in `{s}`"))?;
        out.push_str(&render(&lookup(&after[..end], vars)?));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn substitute_value(v: &Value, vars: &Vars) -> anyhow::Result<Value> {
    Ok(match v {
        Value::String(s) => {
            let t = s.trim();
            let whole = t.starts_with("{{")
                && t.ends_with("}}")
                && t.len() >= 4
                && !t[2..t.len() - 2].contains("{{");
            if whole {
                lookup(&t[2..t.len() - 2], vars)?
            } else {
                Value::String(substitute(s, vars)?)
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| substitute_value(i, vars))
                .collect::<anyhow::Result<_>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((substitute(k, vars)?, substitute_value(v, vars)?)))
                .collect::<anyhow::Result<_>>()?,
        ),
        other => other.clone(),
    })
}

/// Where and how an answer differs from its expected shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// `body`, `body.commands[0].id`, …
    pub path: String,
    pub expected: String,
    pub got: String,
}

impl fmt::Display for ShapeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, got {}",
            self.path, self.expected, self.got
        )
    }
}

impl std::error::Error for ShapeMismatch {}

/// Matches an answer against an expected shape.
///
/// - The strings `"<string>"`, `"<number>"`, `"<bool>"`, `"<null>"`, `"<any>"` match any value
///   of that type, `"<timestamp>"` any ISO 8601 date-time string with a zone (`Z` or an offset).
/// - Other literals must be equal (numbers by value: `1` equals `1.0`).
/// - An object matches when every expected key is present and matches; extra keys are allowed
///   unless the expected object holds `"...": false`.
/// - An array matches when it has the same length and every element matches.
pub fn match_shape(expected: &Value, actual: &Value) -> Result<(), ShapeMismatch> {
    match_at("body", expected, actual)
}

fn mismatch(path: &str, expected: impl Into<String>, actual: &Value) -> ShapeMismatch {
    ShapeMismatch {
        path: path.to_owned(),
        expected: expected.into(),
        got: truncated(&actual.to_string(), 300),
    }
}

fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn match_at(path: &str, expected: &Value, actual: &Value) -> Result<(), ShapeMismatch> {
    match expected {
        Value::String(s) if is_placeholder(s) => {
            let ok = match s.as_str() {
                "<string>" => actual.is_string(),
                "<number>" => actual.is_number(),
                "<bool>" => actual.is_boolean(),
                "<null>" => actual.is_null(),
                "<any>" => true,
                "<timestamp>" => actual.as_str().is_some_and(is_iso8601),
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(mismatch(path, s.clone(), actual))
            }
        }
        Value::Number(e) => match actual {
            Value::Number(a) if numbers_equal(e, a) => Ok(()),
            _ => Err(mismatch(path, e.to_string(), actual)),
        },
        Value::Object(fields) => {
            let Value::Object(got) = actual else {
                return Err(mismatch(path, "an object", actual));
            };
            let closed = fields.get("...") == Some(&Value::Bool(false));
            for (key, want) in fields {
                if key == "..." {
                    continue;
                }
                let here = format!("{path}.{key}");
                match got.get(key) {
                    Some(value) => match_at(&here, want, value)?,
                    None => {
                        return Err(ShapeMismatch {
                            path: here,
                            expected: want.to_string(),
                            got: "no such key".into(),
                        })
                    }
                }
            }
            if closed {
                if let Some(extra) = got.keys().find(|k| !fields.contains_key(*k)) {
                    return Err(ShapeMismatch {
                        path: format!("{path}.{extra}"),
                        expected: "no such key (the object is closed)".into(),
                        got: got[extra].to_string(),
                    });
                }
            }
            Ok(())
        }
        Value::Array(items) => {
            let Value::Array(got) = actual else {
                return Err(mismatch(path, "an array", actual));
            };
            if items.len() != got.len() {
                return Err(mismatch(
                    path,
                    format!("an array of {} element(s)", items.len()),
                    actual,
                ));
            }
            for (i, (want, value)) in items.iter().zip(got).enumerate() {
                match_at(&format!("{path}[{i}]"), want, value)?;
            }
            Ok(())
        }
        literal => {
            if literal == actual {
                Ok(())
            } else {
                Err(mismatch(path, literal.to_string(), actual))
            }
        }
    }
}

fn is_placeholder(s: &str) -> bool {
    matches!(
        s,
        "<string>" | "<number>" | "<bool>" | "<null>" | "<any>" | "<timestamp>"
    )
}

fn numbers_equal(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn is_iso8601(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let num =
        |r: std::ops::Range<usize>| -> u32 { s.get(r).and_then(|d| d.parse().ok()).unwrap_or(99) };
    if b.len() < 20
        || !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10))
        || !matches!(b[10], b'T' | b't')
        || !(digits(11..13) && b[13] == b':' && digits(14..16) && b[16] == b':' && digits(17..19))
    {
        return false;
    }
    if !(1..=12).contains(&num(5..7))
        || !(1..=31).contains(&num(8..10))
        || num(11..13) > 23
        || num(14..16) > 59
        || num(17..19) > 60
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(expected: Value, actual: Value) {
        if let Err(m) = match_shape(&expected, &actual) {
            panic!("{expected} should match {actual}: {m}");
        }
    }

    fn fails(expected: Value, actual: Value) -> ShapeMismatch {
        match match_shape(&expected, &actual) {
            Ok(()) => panic!("{expected} should not match {actual}"),
            Err(m) => m,
        }
    }

    #[test]
    fn literals_must_be_equal() {
        ok(json!("ok"), json!("ok"));
        ok(json!(true), json!(true));
        ok(json!(null), json!(null));
        ok(json!(3), json!(3));
        ok(json!(3), json!(3.0));
        fails(json!("ok"), json!("OK"));
        fails(json!(3), json!("3"));
        fails(json!(false), json!(null));
        fails(json!(-1), json!(1));
    }

    #[test]
    fn placeholders_match_by_type() {
        ok(json!("<string>"), json!(""));
        ok(json!("<number>"), json!(1.5));
        ok(json!("<bool>"), json!(false));
        ok(json!("<null>"), json!(null));
        ok(json!("<any>"), json!({"a": [1]}));
        ok(json!("<any>"), json!(null));
        fails(json!("<string>"), json!(1));
        fails(json!("<number>"), json!("1"));
        fails(json!("<bool>"), json!("true"));
        fails(json!("<null>"), json!(0));
        fails(json!("<null>"), json!("<null>"));
    }

    #[test]
    fn timestamps_are_iso_8601_with_a_zone() {
        for good in [
            "2025-09-16T12:34:56Z",
            "2025-09-16T12:34:56.123Z",
            "2025-09-16T12:34:56+02:00",
            "2025-09-16T12:34:56.5-05:30",
        ] {
            ok(json!("<timestamp>"), json!(good));
        }
        for bad in [
            json!("2025-09-16 12:34:56"),
            json!("2025-09-16T12:34:56"),
            json!("2025-13-16T12:34:56Z"),
            json!("2025-09-16T12:34:56.Z"),
            json!("16/09/2025"),
            json!(1758026096),
            json!(null),
        ] {
            fails(json!("<timestamp>"), bad);
        }
    }

    #[test]
    fn objects_allow_extra_keys_unless_closed() {
        ok(json!({"ack": true}), json!({"ack": true, "event_id": "e1"}));
        ok(json!({}), json!({"anything": 1}));
        let m = fails(
            json!({"ack": true, "...": false}),
            json!({"ack": true, "event_id": "e1"}),
        );
        assert_eq!(m.path, "body.event_id");
        ok(
            json!({"ack": true, "event_id": "<string>", "...": false}),
            json!({"ack": true, "event_id": "e1"}),
        );
        let m = fails(json!({"code": "missing_token"}), json!({"error": "x"}));
        assert_eq!(m.path, "body.code");
        assert_eq!(m.got, "no such key");
        fails(json!({}), json!([]));
    }

    #[test]
    fn arrays_match_element_wise_with_equal_length() {
        ok(json!([]), json!([]));
        ok(
            json!([{"id": "<number>"}, "<string>"]),
            json!([{"id": 7, "x": 1}, "a"]),
        );
        let m = fails(json!([1, 2]), json!([1]));
        assert_eq!(m.path, "body");
        let m = fails(
            json!({"commands": [{"id": "<number>"}]}),
            json!({"commands": [{"id": "7"}]}),
        );
        assert_eq!(m.path, "body.commands[0].id");
        assert_eq!(m.expected, "<number>");
        assert_eq!(m.got, "\"7\"");
        fails(json!([]), json!({}));
    }

    #[test]
    fn variables_substitute_in_strings_and_keep_types_when_whole() {
        let mut vars = Vars::new();
        vars.insert("mac".into(), json!("02:AB:CD:EF:01:C0"));
        vars.insert("id".into(), json!(42));
        assert_eq!(
            substitute("/api/device/{{mac}}/commands/{{id}}/", &vars).unwrap(),
            "/api/device/02:AB:CD:EF:01:C0/commands/42/"
        );
        assert_eq!(
            substitute("{{mac|lower}} {{ mac | dashes }} {{mac|bare|lower}}", &vars).unwrap(),
            "02:ab:cd:ef:01:c0 02-AB-CD-EF-01-C0 02abcdef01c0"
        );
        assert_eq!(
            substitute_value(
                &json!({"id": "{{id}}", "s": "n={{id}}", "l": ["{{mac|lower}}"]}),
                &vars
            )
            .unwrap(),
            json!({"id": 42, "s": "n=42", "l": ["02:ab:cd:ef:01:c0"]})
        );
        assert_eq!(
            substitute("mac={{mac|url}}", &vars).unwrap(),
            "mac=02%3AAB%3ACD%3AEF%3A01%3AC0"
        );
        assert!(substitute("{{nope}}", &vars).is_err());
        assert!(substitute("{{mac", &vars).is_err());
        assert!(substitute("{{mac|reverse}}", &vars).is_err());
    }

    #[test]
    fn builtins_are_fresh_per_replay_and_shaped_like_macs() {
        let a = builtin_vars();
        let prefix = a["mac_prefix"].as_str().unwrap();
        assert_eq!(prefix.len(), 14);
        assert!(prefix.starts_with("02:"));
        assert_eq!(a["run"].as_str().unwrap().len(), 8);
        assert_ne!(builtin_vars()["run"], a["run"]);
    }

    #[test]
    fn captures_follow_dotted_paths() {
        let mut vars = Vars::new();
        let answer = json!({"token": "t", "commands": [{"id": 5, "command_id": "cmd-x"}]});
        let spec = BTreeMap::from([
            ("token".to_owned(), "token".to_owned()),
            ("pk".to_owned(), "commands.0.id".to_owned()),
        ]);
        capture(&spec, &answer, &mut vars).unwrap();
        assert_eq!(vars["token"], json!("t"));
        assert_eq!(vars["pk"], json!(5));
        let missing = BTreeMap::from([("x".to_owned(), "commands.1.id".to_owned())]);
        assert!(capture(&missing, &answer, &mut vars).is_err());
    }

    #[test]
    fn steps_need_exactly_one_action() {
        let both: Result<Step, _> = serde_json::from_value(json!({
            "request": {"method": "GET", "path": "/"}, "admin": ["x"], "expect": {"status": 200}
        }));
        assert!(both.is_err());
        let no_status: Result<Step, _> =
            serde_json::from_value(json!({"request": {"method": "GET", "path": "/"}}));
        assert!(no_status.is_err());
        let typo: Result<Step, _> = serde_json::from_value(json!({
            "request": {"method": "GET", "path": "/"}, "expect": {"status": 200}, "captrue": {}
        }));
        assert!(typo.is_err());
        let admin: Step = serde_json::from_value(json!({"admin": ["device", "assign"]})).unwrap();
        assert!(matches!(admin.action, Action::Admin(_)));
    }

    /// Answers every request on every connection with `response`.
    async fn canned_server(response: &'static str) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        if buf.len() >= end + 4 + len {
                            buf.drain(..end + 4 + len);
                            sock.write_all(response.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    fn no_admin() -> impl FnMut(&[String]) -> anyhow::Result<String> + Send {
        |_: &[String]| -> anyhow::Result<String> { bail!("no operator commands here") }
    }

    fn vector(steps: Value) -> Vector {
        let mut v: Vector = serde_json::from_value(json!({
            "name": "sample", "description": "a test vector", "steps": steps
        }))
        .unwrap();
        v.file = "00_sample.json".into();
        v
    }

    #[tokio::test]
    async fn replay_passes_and_captures_across_steps() {
        let addr = canned_server(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 38\r\n\r\n{\"device_id\":\"AA\",\"token\":\"t-1\",\"n\":7}",
        )
        .await;
        let v = vector(json!([
            {"request": {"method": "POST", "path": "/api/handshake/", "json": {"mac": "{{mac_prefix}}:01"}},
             "expect": {"status": 200, "body": {"device_id": "<string>", "token": "<string>", "n": "<number>"},
                        "headers": {"content-type": "application/json"}},
             "capture": {"token": "token", "n": "n"}},
            {"request": {"method": "GET", "path": "/x/{{n}}", "headers": {"Authorization": "Bearer {{token}}"}},
             "expect": {"status": 200, "body": {"token": "{{token}}", "n": "{{n}}", "...": true}}}
        ]));
        assert!(!v.needs_admin());
        v.replay(addr, &mut no_admin()).await.unwrap();
    }

    #[tokio::test]
    async fn replay_failures_name_the_vector_step_and_difference() {
        let addr = canned_server(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: 27\r\n\r\n{\"code\":\"invalid_token\"}   ",
        )
        .await;
        let v = vector(json!([
            {"note": "post an event", "request": {"method": "POST", "path": "/api/events/", "json": {}},
             "expect": {"status": 200, "body": {"ack": true}}}
        ]));
        let err = v
            .replay(addr, &mut no_admin())
            .await
            .unwrap_err()
            .to_string();
        for part in [
            "vector `sample`",
            "00_sample.json",
            "step 1/1",
            "post an event",
            "POST /api/events/",
            "expected 200, got 401",
            "invalid_token",
        ] {
            assert!(err.contains(part), "`{part}` missing from: {err}");
        }
        let v = vector(json!([
            {"request": {"method": "POST", "path": "/api/events/", "json": {}},
             "expect": {"status": 401, "body": {"code": "device_mismatch"}}}
        ]));
        let err = v
            .replay(addr, &mut no_admin())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(r#"body.code: expected "device_mismatch", got "invalid_token""#),
            "{err}"
        );
    }

    #[tokio::test]
    async fn admin_steps_run_the_operator_and_capture_its_output() {
        let addr = canned_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
        let v = vector(json!([
            {"admin": ["command", "send", "{{mac_prefix}}:01", "RESET"],
             "expect": {"body": {"command_id": "<string>"}},
             "capture": {"cmd": "command_id"}},
            {"admin": ["echo", "{{cmd}}"]}
        ]));
        assert!(v.needs_admin());
        let mut seen: Vec<Vec<String>> = Vec::new();
        let mut admin = |args: &[String]| -> anyhow::Result<String> {
            seen.push(args.to_vec());
            Ok("log line\n{\"id\": 3, \"command_id\": \"cmd-abc\"}\n".into())
        };
        v.replay(addr, &mut admin).await.unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen[0][2].starts_with("02:") && seen[0][2].ends_with(":01"));
        assert_eq!(seen[1], ["echo", "cmd-abc"]);
    }

    #[test]
    fn replay_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        let v = vector(json!([{"admin": ["x"]}]));
        let mut admin = no_admin();
        let fut = v.replay("127.0.0.1:9".parse().unwrap(), &mut admin);
        is_send(&fut);
    }

    #[test]
    fn shipped_vectors_load() {
        let vectors = load_vectors(Path::new(VECTORS_DIR)).unwrap();
        assert!(!vectors.is_empty());
        let mut names: Vec<&str> = vectors.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), vectors.len(), "vector names are unique");
    }
}
