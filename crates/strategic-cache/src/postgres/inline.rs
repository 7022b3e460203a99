//! The hot-path reads with their values written into the SQL text as literals, for a pooler
//! that keeps no statement from one `Sync` to the next ([`Pooler::PgBouncerTransaction`]).
//!
//! Such a read goes as one `Query` message of the simple query protocol: one round trip, and
//! nothing that must still be on the server connection when the next message arrives. Its
//! results come back as text, which every column type the reads return decodes from (text,
//! `int4`, `int8`, `float8`, `bool`, `uuid`, `jsonb`, `timestamptz` in the ISO `DateStyle`
//! sqlx asks for at startup, which PgBouncer passes on to every server connection).
//!
//! [`Pooler::PgBouncerTransaction`]: super::Pooler::PgBouncerTransaction

use std::fmt::Write as _;

use sea_orm::sqlx;

/// A value of a read, to be written into its SQL as a literal.
#[derive(Clone, Copy, Debug)]
pub(super) enum Literal<'a> {
    Text(&'a str),
    Int(i32),
    /// `ARRAY[...]` of text constants (the batched lookup's key columns).
    Texts(&'a [String]),
    /// `ARRAY[...]` of integers.
    Ints(&'a [i32]),
}

/// `text` appended to `out` as an escape string constant, `E'...'`: in that form a backslash
/// is an escape whatever `standard_conforming_strings` says, so escaping `\` and `'` makes
/// any text one constant. NUL, which no PostgreSQL text can hold, is refused.
pub(super) fn quote_text(text: &str, out: &mut String) -> Result<(), sqlx::Error> {
    if text.contains('\0') {
        return Err(sqlx::Error::Encode(
            "a text value holds a NUL character, which PostgreSQL cannot store".into(),
        ));
    }
    out.reserve(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            // Doubled rather than `\'`, which `backslash_quote` may forbid.
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out.push('\'');
    Ok(())
}

/// `n` appended to `out`, in parentheses when negative (so that `$1::int4` stays a cast of
/// the whole number).
fn write_int(n: i32, out: &mut String) {
    if n < 0 {
        let _ = write!(out, "({n})");
    } else {
        let _ = write!(out, "{n}");
    }
}

fn write_literal(value: Literal<'_>, out: &mut String) -> Result<(), sqlx::Error> {
    match value {
        Literal::Text(text) => quote_text(text, out)?,
        Literal::Int(n) => write_int(n, out),
        Literal::Texts(texts) => {
            out.push_str("ARRAY[");
            for (i, text) in texts.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                quote_text(text, out)?;
            }
            out.push(']');
        }
        Literal::Ints(ints) => {
            out.push_str("ARRAY[");
            for (i, n) in ints.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_int(*n, out);
            }
            out.push(']');
        }
    }
    Ok(())
}

/// `sql` with each parameter `$n` replaced by `values[n - 1]` as a literal.
///
/// For the library's own generated reads (`statements.rs`), which hold no string constant
/// or dollar quote of their own: a `$` is always a parameter there (a test renders each).
pub(super) fn render(sql: &str, values: &[Literal<'_>]) -> Result<String, sqlx::Error> {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let value = after[..digits]
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| values.get(i))
            .ok_or_else(|| {
                sqlx::Error::Encode(
                    format!("no value for the parameter at `{}`", &rest[at..]).into(),
                )
            })?;
        write_literal(*value, &mut out)?;
        rest = &after[digits..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::Component;
    use crate::postgres::statements::{lookup_many_sql, snapshot_sql, sql};

    fn quoted(text: &str) -> String {
        let mut out = String::new();
        quote_text(text, &mut out).unwrap();
        out
    }

    /// Quotes and backslashes are escaped, everything else is kept as it is, and NUL is refused.
    #[test]
    fn text_is_one_escape_string_constant() {
        assert_eq!(quoted("bot"), "E'bot'");
        assert_eq!(quoted(""), "E''");
        assert_eq!(quoted("o'brien"), "E'o''brien'");
        assert_eq!(quoted(r"a\b"), r"E'a\\b'");
        assert_eq!(quoted(r"\'"), r"E'\\'''");
        assert_eq!(quoted("ünï 😀"), "E'ünï 😀'");
        let mut out = String::new();
        assert!(quote_text("a\0b", &mut out).is_err());
    }

    /// Parameters are replaced by number (`$1` is not the start of `$10`), negative integers
    /// are parenthesized, arrays are written out, and a missing value is an error.
    #[test]
    fn parameters_are_replaced_by_number() {
        let ten: Vec<Literal<'_>> = (1..=10).map(Literal::Int).collect();
        assert_eq!(render("$10 + $1", &ten).unwrap(), "10 + 1");
        assert_eq!(
            render("x = $1::int4", &[Literal::Int(-5)]).unwrap(),
            "x = (-5)::int4"
        );
        let texts = ["a".to_owned(), "b'".to_owned()];
        assert_eq!(
            render(
                "unnest($1::text[], $2::int4[])",
                &[Literal::Texts(&texts), Literal::Ints(&[1, -2])]
            )
            .unwrap(),
            "unnest(ARRAY[E'a',E'b''']::text[], ARRAY[1,(-2)]::int4[])"
        );
        assert!(render("$3", &[Literal::Int(1)]).is_err());
        assert!(render("$", &[Literal::Int(1)]).is_err());
        assert!(render("$0", &[Literal::Int(1)]).is_err());
    }

    /// Every hot-path read renders with no parameter left in it.
    #[test]
    fn every_read_renders_whole() {
        for component in Component::ALL {
            let key = [Literal::Text("u"), Literal::Int(1)];
            let lookup = render(&sql(component).lookup, &key).unwrap();
            assert!(!lookup.contains('$'), "{lookup}");
            let texts = ["u".to_owned()];
            let many = render(
                lookup_many_sql(component),
                &[Literal::Texts(&texts), Literal::Ints(&[1])],
            )
            .unwrap();
            assert!(!many.contains('$'), "{many}");
        }
        let args = [Literal::Text("u"), Literal::Text("b"), Literal::Int(168)];
        let snapshot = render(snapshot_sql(), &args).unwrap();
        assert!(!snapshot.contains('$'), "{snapshot}");
        assert!(
            snapshot.contains("= E'u'") && snapshot.contains("= 168"),
            "{snapshot}"
        );
    }
}
