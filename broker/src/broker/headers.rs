//! The headers exchange's matcher, with RabbitMQ's rules: `x-match` is `all` (the default),
//! `any`, `all-with-x` or `any-with-x`; binding arguments starting with `x-` take part only in the
//! `-with-x` forms; a void argument asks only that the header be present; integers compare by
//! value whatever their width, as do floats.

use amq_protocol::types::{AMQPValue, FieldTable};

#[derive(Debug, Clone, PartialEq)]
pub struct HeadersMatch {
    any: bool,
    pattern: Vec<(String, AMQPValue)>,
}

impl HeadersMatch {
    /// Builds the matcher for a binding's arguments, or says why they are invalid (RabbitMQ
    /// refuses such a binding with 406 and this text).
    pub fn from_arguments(arguments: &FieldTable) -> Result<Self, String> {
        let (any, with_x) = match arguments.inner().get("x-match") {
            None => (false, false),
            Some(AMQPValue::LongString(s)) => match s.as_bytes() {
                b"all" => (false, false),
                b"any" => (true, false),
                b"all-with-x" => (false, true),
                b"any-with-x" => (true, true),
                other => {
                    return Err(format!(
                        "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
                        String::from_utf8_lossy(other)
                    ));
                }
            },
            Some(other) => {
                return Err(format!(
                    "Invalid x-match field type {} (value {}); expected longstr",
                    type_name(other),
                    value_text(other)
                ));
            }
        };
        let pattern = arguments
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
            .collect();
        Ok(Self { any, pattern })
    }

    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let empty = FieldTable::default();
        let headers = headers.unwrap_or(&empty).inner();
        let mut hits = self
            .pattern
            .iter()
            .map(|(key, want)| match headers.get(key.as_str()) {
                None => false,
                Some(have) => matches!(want, AMQPValue::Void) || values_equal(want, have),
            });
        if self.any {
            hits.any(|hit| hit)
        } else {
            hits.all(|hit| hit)
        }
    }
}

/// A field value of any integer type, as one integer.
pub fn integer(v: &AMQPValue) -> Option<i64> {
    Some(match *v {
        AMQPValue::ShortShortInt(x) => x.into(),
        AMQPValue::ShortShortUInt(x) => x.into(),
        AMQPValue::ShortInt(x) => x.into(),
        AMQPValue::ShortUInt(x) => x.into(),
        AMQPValue::LongInt(x) => x.into(),
        AMQPValue::LongUInt(x) => x.into(),
        AMQPValue::LongLongInt(x) => x,
        _ => return None,
    })
}

/// A field value of either string type, as text.
pub fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn as_int(v: &AMQPValue) -> Option<i128> {
    integer(v).map(i128::from)
}

fn as_float(v: &AMQPValue) -> Option<f64> {
    match *v {
        AMQPValue::Float(x) => Some(x.into()),
        AMQPValue::Double(x) => Some(x),
        _ => None,
    }
}

fn as_string(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// Equality within RabbitMQ's type classes (all integers alike, both float widths alike).
pub fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (as_int(a), as_int(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_float(a), as_float(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (as_string(a), as_string(b)) {
        return x == y;
    }
    a == b
}

/// RabbitMQ's name for a field value's type, as it appears in its error texts.
pub fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// A field value written the way RabbitMQ's error texts show it.
pub fn value_text(v: &AMQPValue) -> String {
    if let Some(i) = as_int(v) {
        return i.to_string();
    }
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(d) => d.to_string(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::Void => "undefined".to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::ShortString;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn all_needs_every_header_and_any_needs_one() {
        let all = HeadersMatch::from_arguments(&table(&[("a", s("1")), ("b", s("2"))])).unwrap();
        let any = HeadersMatch::from_arguments(&table(&[
            ("x-match", s("any")),
            ("a", s("1")),
            ("b", s("2")),
        ]))
        .unwrap();
        let both = table(&[("a", s("1")), ("b", s("2")), ("c", s("3"))]);
        let one = table(&[("a", s("1"))]);
        assert!(all.matches(Some(&both)));
        assert!(!all.matches(Some(&one)));
        assert!(any.matches(Some(&one)));
        assert!(!any.matches(Some(&table(&[("a", s("9"))]))));
        assert!(!any.matches(None));
    }

    #[test]
    fn x_arguments_count_only_with_x() {
        let plain = HeadersMatch::from_arguments(&table(&[("x-k", s("v"))])).unwrap();
        assert!(
            plain.matches(None),
            "an all-match with no real keys matches everything"
        );
        let with_x =
            HeadersMatch::from_arguments(&table(&[("x-match", s("all-with-x")), ("x-k", s("v"))]))
                .unwrap();
        assert!(!with_x.matches(None));
        assert!(with_x.matches(Some(&table(&[("x-k", s("v"))]))));
    }

    #[test]
    fn integers_compare_by_value_and_void_means_present() {
        let m = HeadersMatch::from_arguments(&table(&[
            ("n", AMQPValue::LongInt(5)),
            ("p", AMQPValue::Void),
        ]))
        .unwrap();
        assert!(m.matches(Some(&table(&[
            ("n", AMQPValue::LongLongInt(5)),
            ("p", s("anything"))
        ]))));
        assert!(!m.matches(Some(&table(&[("n", AMQPValue::LongLongInt(5))]))));
        assert!(!m.matches(Some(&table(&[("n", s("5")), ("p", s(""))]))));
    }

    #[test]
    fn bad_x_match_is_refused() {
        assert!(HeadersMatch::from_arguments(&table(&[("x-match", s("some"))])).is_err());
        assert!(
            HeadersMatch::from_arguments(&table(&[("x-match", AMQPValue::LongInt(1))])).is_err()
        );
    }
}
