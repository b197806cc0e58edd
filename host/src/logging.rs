//! The host's logs: `tracing` events on stderr, filtered by `WASM_PC_LOG`
//! (`EnvFilter` syntax), as text for a person or JSON for a collector.
//!
//! Every delivery opens a `deliver` span, and the fmt layer formats a span's
//! fields when it opens, whether or not an event inside it is ever logged.
//! tracing-subscriber's JSON field formatter builds a `serde_json` map for
//! that and serializes it through `fmt::Write`: opening the span took 8,200
//! instructions, 4 % of an embedded delivery. [`JsonSpanFields`] writes the
//! same JSON object straight into the span's buffer; with it, JSON logging
//! at `info` costs a delivery 6,400 instructions in all (docs/BENCHMARKS.md,
//! "What logging costs a delivery").

use std::fmt::{self, Write as _};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter when `WASM_PC_LOG` is unset or unparsable.
const DEFAULT_FILTER: &str = "info,wasmtime=warn,cranelift=warn";

/// Installs the process's subscriber: the binary's, and the benchmarks'
/// when they measure what logging costs a delivery.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WASM_PC_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colour only for a person at a terminal, never into files or collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    subscriber(format, filter, std::io::stderr, ansi).init();
}

/// The subscriber `init` installs, writing to `writer`.
fn subscriber<W>(format: LogFormat, filter: EnvFilter, writer: W, ansi: bool) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Json => Box::new(builder.json().fmt_fields(JsonSpanFields).finish()),
        LogFormat::Text => Box::new(builder.finish()),
    }
}

/// A span's fields as one JSON object, the form the JSON event formatter
/// reads them back in.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        writer.write_char('{')?;
        let mut object = JsonObject { out: &mut writer, empty: true, result: Ok(()) };
        fields.record(&mut object);
        object.result?;
        writer.write_char('}')
    }

    /// Fields recorded later join the object (the default would append
    /// them after it, which is no longer JSON).
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.pop() != Some('}') {
            current.fields.clear();
            return self.format_fields(current.as_writer(), fields);
        }
        let empty = current.fields.ends_with('{');
        let mut object = JsonObject { out: &mut current.fields, empty, result: Ok(()) };
        fields.record(&mut object);
        let result = object.result;
        current.fields.push('}');
        result
    }
}

/// Writes each field it visits as `"name":value` into an open object.
struct JsonObject<'a> {
    out: &'a mut dyn fmt::Write,
    empty: bool,
    result: fmt::Result,
}

impl JsonObject<'_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let separator = if self.empty { "\"" } else { ",\"" };
        self.empty = false;
        self.result = self
            .out
            .write_str(separator)
            .and_then(|()| Escaped(&mut *self.out).write_str(field.name()))
            .and_then(|()| self.out.write_str("\":"))
            .and_then(|()| value(&mut *self.out));
    }
}

impl Visit for JsonObject<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| quoted(out, |escaped| escaped.write_str(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| quoted(out, |escaped| write!(escaped, "{value:?}")));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those go as strings.
        if value.is_finite() {
            self.entry(field, |out| write!(out, "{value}"));
        } else {
            self.entry(field, |out| write!(out, "\"{value}\""));
        }
    }
}

/// `"` + what `body` writes, escaped + `"`.
fn quoted(out: &mut dyn fmt::Write, body: impl FnOnce(&mut Escaped<'_>) -> fmt::Result) -> fmt::Result {
    out.write_char('"')?;
    body(&mut Escaped(&mut *out))?;
    out.write_char('"')
}

/// Escapes what is written through it as the inside of a JSON string.
struct Escaped<'a>(&'a mut dyn fmt::Write);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Everything JSON escapes is ASCII, so a byte scan finds it and
        // every slice between escapes falls on a char boundary.
        let mut plain = 0;
        for (at, byte) in s.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                byte if byte < b' ' => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = at + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::ErrorKind::Other)?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Lines {
        type Writer = Lines;
        fn make_writer(&'w self) -> Lines {
            self.clone()
        }
    }

    /// The JSON lines of events logged inside spans while `log` runs.
    fn json_lines(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let lines = Lines::default();
        let subscriber = subscriber(LogFormat::Json, EnvFilter::new("info"), lines.clone(), false);
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect()
    }

    #[test]
    fn span_fields_reach_the_json_lines_as_written() {
        let id = "a \"quoted\" id\\with\nnewline\ttab\u{1}bell, ünïcode ✓";
        let events = json_lines(|| {
            let span = tracing::info_span!(
                "deliver",
                messaging.message.id = %id,
                text = id,
                n = 7u64,
                neg = -3i64,
                yes = true,
                half = 0.5,
                nan = f64::NAN,
                late = tracing::field::Empty,
            );
            let _entered = span.enter();
            tracing::info!("inside");
            span.record("late", "recorded \"later\"");
            tracing::info!("after a record");
        });
        assert_eq!(events.len(), 2, "{events:?}");
        let expected = serde_json::json!({
            "name": "deliver",
            "messaging.message.id": id,
            "text": id,
            "n": 7,
            "neg": -3,
            "yes": true,
            "half": 0.5,
            "nan": "NaN",
        });
        assert_eq!(events[0]["span"], expected);
        assert_eq!(events[0]["spans"], serde_json::json!([expected]));
        let mut later = expected;
        later["late"] = "recorded \"later\"".into();
        assert_eq!(events[1]["span"], later);
    }

    #[test]
    fn a_span_with_no_fields_until_one_is_recorded_stays_an_object() {
        let events = json_lines(|| {
            let outer = tracing::info_span!("outer", late = tracing::field::Empty);
            let _outer = outer.enter();
            let inner = tracing::info_span!("inner");
            let _inner = inner.enter();
            tracing::info!("before");
            outer.record("late", 1u64);
            tracing::info!("after");
        });
        assert_eq!(events[0]["spans"], serde_json::json!([{"name": "outer"}, {"name": "inner"}]));
        assert_eq!(events[1]["spans"], serde_json::json!([{"name": "outer", "late": 1}, {"name": "inner"}]));
    }
}
