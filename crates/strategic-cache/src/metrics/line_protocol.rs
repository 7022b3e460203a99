//! InfluxDB line protocol rendering, escaped per the specification
//! (<https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/#special-characters>):
//!
//! | element                          | escaped with a backslash      |
//! |----------------------------------|-------------------------------|
//! | measurement                      | comma, space                  |
//! | tag key, tag value, field key    | comma, equals sign, space     |
//! | string field value               | double quote, backslash       |
//!
//! Two further rules close the gaps the table leaves:
//!
//! - **Backslashes in names** are written as `\\`. The specification reads two contiguous
//!   backslashes as one literal backslash, and a lone backslash just before a comma, space or
//!   the end of a tag value would otherwise escape the delimiter and corrupt the line (a bot
//!   named `a\` would swallow the space that ends the tag set).
//! - **Newlines and other control characters** are not supported in tag values at all ("line
//!   protocol does not support the newline character in tag or field values"), and escaping
//!   them is not part of the format, so [`sanitize_tag_value`] replaces each with a space
//!   before escaping. An empty tag value is not allowed either; it becomes
//!   [`UNNAMED_BOT`](super::UNNAMED_BOT).
//!
//! ```
//! use strategic_cache::metrics::line_protocol::{escape_tag, sanitize_tag_value};
//! let mut out = String::new();
//! escape_tag(&sanitize_tag_value("my bot,v=2\nx"), &mut out);
//! assert_eq!(out, r"my\ bot\,v\=2\ x");
//! ```

use std::fmt::Write as _;

/// Appends `s` escaped as a measurement name (comma, space; backslash doubled).
pub fn escape_measurement(s: &str, out: &mut String) {
    escape(s, out, &[',', ' ']);
}

/// Appends `s` escaped as a tag key, tag value or field key (comma, equals sign, space;
/// backslash doubled). `s` must already be free of control characters
/// ([`sanitize_tag_value`]).
pub fn escape_tag(s: &str, out: &mut String) {
    escape(s, out, &[',', '=', ' ']);
}

/// Appends `s` as a quoted string field value (double quote and backslash escaped; control
/// characters, which line protocol does not support in field values, become spaces).
pub fn escape_string_field(s: &str, out: &mut String) {
    out.push('"');
    escape(s, out, &['"']);
    out.push('"');
}

fn escape(s: &str, out: &mut String, special: &[char]) {
    for c in s.chars() {
        // Defence in depth: a control character never reaches the output, whatever element
        // it is in, because a raw newline would end the line.
        let c = if c.is_control() { ' ' } else { c };
        if c == '\\' || special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Makes `raw` representable as a tag value: control characters (newline, carriage return,
/// tab, ...) become spaces, and an empty value becomes [`UNNAMED_BOT`](super::UNNAMED_BOT).
/// Everything else, unicode included, is kept and escaped by [`escape_tag`].
pub fn sanitize_tag_value(raw: &str) -> String {
    if raw.is_empty() {
        return super::UNNAMED_BOT.to_owned();
    }
    raw.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Builds one line: `measurement[,tag=value...] field=value[,...] timestamp\n`.
/// Tags are written in the order given (callers pass them sorted by key, as InfluxDB prefers).
#[derive(Debug)]
pub(crate) struct LineBuilder<'a> {
    out: &'a mut String,
    fields: usize,
}

impl<'a> LineBuilder<'a> {
    pub(crate) fn new(out: &'a mut String, measurement: &str) -> Self {
        escape_measurement(measurement, out);
        LineBuilder { out, fields: 0 }
    }

    pub(crate) fn tag(self, key: &str, value: &str) -> Self {
        self.out.push(',');
        escape_tag(key, self.out);
        self.out.push('=');
        escape_tag(value, self.out);
        self
    }

    fn field_key(&mut self, key: &str) {
        self.out.push(if self.fields == 0 { ' ' } else { ',' });
        self.fields += 1;
        escape_tag(key, self.out);
        self.out.push('=');
    }

    /// An integer field (`42i`).
    pub(crate) fn int(mut self, key: &str, value: u64) -> Self {
        self.field_key(key);
        // Line protocol integers are signed 64-bit; saturate rather than overflow.
        let _ = write!(self.out, "{}i", value.min(i64::MAX as u64));
        self
    }

    /// A float field; non-finite values are skipped (line protocol has no NaN or infinity).
    pub(crate) fn float(mut self, key: &str, value: f64) -> Self {
        if value.is_finite() {
            self.field_key(key);
            let _ = write!(self.out, "{value}");
        }
        self
    }

    /// A boolean field (`true` / `false`).
    pub(crate) fn bool(mut self, key: &str, value: bool) -> Self {
        self.field_key(key);
        self.out.push_str(if value { "true" } else { "false" });
        self
    }

    /// A string field, quoted and escaped.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn string(mut self, key: &str, value: &str) -> Self {
        self.field_key(key);
        escape_string_field(value, self.out);
        self
    }

    /// Ends the line with a nanosecond timestamp.
    pub(crate) fn finish(self, timestamp_ns: i64) {
        let _ = writeln!(self.out, " {timestamp_ns}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(raw: &str) -> String {
        let mut out = String::new();
        escape_tag(&sanitize_tag_value(raw), &mut out);
        out
    }

    /// Tag values escape exactly comma, equals sign and space (and double backslashes);
    /// quotes and unicode pass through; control characters become escaped spaces.
    #[test]
    fn metrics_tag_values_escape_hostile_bot_names() {
        assert_eq!(tag("elena"), "elena");
        assert_eq!(tag("bot with space"), r"bot\ with\ space");
        assert_eq!(tag("a,b=c"), r"a\,b\=c");
        assert_eq!(tag("say \"hi\""), r#"say\ "hi""#);
        assert_eq!(tag(r"back\slash\"), r"back\\slash\\");
        assert_eq!(tag("new\nline\r\ttab"), r"new\ line\ \ tab");
        assert_eq!(tag("ünïcødé 🤖"), r"ünïcødé\ 🤖");
        assert_eq!(tag(""), "_unnamed");
        assert_eq!(tag("'; DROP"), r"';\ DROP");
    }

    /// Measurements escape comma and space only; string fields escape quote and backslash.
    #[test]
    fn metrics_measurement_and_string_field_escaping() {
        let mut m = String::new();
        escape_measurement("a b,c=d", &mut m);
        assert_eq!(m, r"a\ b\,c=d");
        let mut s = String::new();
        escape_string_field(r#"x "y" \z, =w"#, &mut s);
        assert_eq!(s, r#""x \"y\" \\z, =w""#);
    }

    /// A whole line has one space between measurement+tags, fields and timestamp, and no
    /// newline other than its terminator, whatever the bot name.
    #[test]
    fn metrics_line_structure_survives_hostile_names() {
        for raw in [
            "a b", "a,b", "a=b", "a\"b", "a\\", "a\nb", "ü", "", " ", "\\ ,=",
        ] {
            let mut out = String::new();
            LineBuilder::new(&mut out, "strategic_cache_reads")
                .tag("bot", &sanitize_tag_value(raw))
                .tag("table", "memory_health")
                .int("hit", 3)
                .float("hit_rate", 0.5)
                .float("nan", f64::NAN)
                .string("note", raw)
                .finish(7);
            assert_eq!(out.matches('\n').count(), 1, "{out:?}");
            assert!(out.ends_with(" 7\n"), "{out}");
            // Split on unescaped spaces: the tag set, the field set and the timestamp.
            let head = out.split(" hit=").next().unwrap_or_default();
            assert!(!head.contains('\n'), "{head:?}");
            assert!(out.contains(" hit=3i,hit_rate=0.5,note="), "{out}");
            assert!(!out.contains("nan"), "non-finite float skipped: {out}");
        }
    }
}
