//! AMQP field tables and values as JSON, the way RabbitMQ's management API shows them:
//! integers as numbers, strings as strings, tables as objects; JSON integers become signed
//! 64-bit `long`s, as RabbitMQ makes them.
//!
//! That JSON loses types (a `short` 5 reads back as a `long` 5). Where a value must come back
//! as it was (the definitions snapshot), [`types_of`] gives the types the plain JSON does not
//! tell, and [`typed_table`] reads the plain JSON back with them.

use crate::amqp::codec::MAX_TABLE_DEPTH;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde_json::{Map, Number, Value};

pub fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(x) => (*x).into(),
        AMQPValue::ShortShortUInt(x) => (*x).into(),
        AMQPValue::ShortInt(x) => (*x).into(),
        AMQPValue::ShortUInt(x) => (*x).into(),
        AMQPValue::LongInt(x) => (*x).into(),
        AMQPValue::LongUInt(x) => (*x).into(),
        AMQPValue::LongLongInt(x) => (*x).into(),
        AMQPValue::Timestamp(x) => (*x).into(),
        AMQPValue::Float(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let scaled = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(scaled).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::Void => Value::Null,
    }
}

/// A table as a JSON object, keys sorted (RabbitMQ shows binding arguments sorted).
pub fn table_to_json(t: &FieldTable) -> Value {
    let mut map = Map::new();
    for (k, v) in t.inner() {
        map.insert(k.as_str().to_owned(), value_to_json(v));
    }
    Value::Object(map)
}

/// Why a JSON value has no AMQP equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrepresentable {
    pub key: String,
    pub why: &'static str,
}

/// Why a table or array is refused: it nests deeper than AMQP frames may
/// (see [`MAX_TABLE_DEPTH`]).
const TOO_DEEP: &str = "tables and arrays nested deeper than 32 levels";
const _: () = assert!(MAX_TABLE_DEPTH == 32, "TOO_DEEP names the limit");

/// A value inside a table or array at `depth`.
fn value_at(v: &Value, depth: usize) -> Result<AMQPValue, &'static str> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                AMQPValue::LongLongInt(i)
            } else if n.as_u64().is_some() {
                return Err("integer out of range");
            } else {
                AMQPValue::Double(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => {
            if depth >= MAX_TABLE_DEPTH {
                return Err(TOO_DEEP);
            }
            let mut a = FieldArray::default();
            for item in items {
                a.push(value_at(item, depth + 1)?);
            }
            AMQPValue::FieldArray(a)
        }
        Value::Object(o) => AMQPValue::FieldTable(table_at(o, depth + 1).map_err(|e| {
            if e.why == TOO_DEEP {
                TOO_DEEP
            } else {
                "nested value has no AMQP equivalent"
            }
        })?),
    })
}

/// A JSON object as a field table; like a table on the wire, it may nest no deeper than
/// [`MAX_TABLE_DEPTH`].
pub fn json_to_table(o: &Map<String, Value>) -> Result<FieldTable, Unrepresentable> {
    table_at(o, 1)
}

/// A table at `depth` (the outermost is 1).
fn table_at(o: &Map<String, Value>, depth: usize) -> Result<FieldTable, Unrepresentable> {
    if depth > MAX_TABLE_DEPTH {
        return Err(Unrepresentable {
            key: String::new(),
            why: TOO_DEEP,
        });
    }
    let mut t = FieldTable::default();
    for (k, v) in o {
        if k.len() > 255 {
            return Err(Unrepresentable {
                key: k.clone(),
                why: "key longer than 255 bytes",
            });
        }
        let value = value_at(v, depth).map_err(|why| Unrepresentable {
            key: k.clone(),
            why,
        })?;
        t.insert(k.as_str().into(), value);
    }
    Ok(t)
}

// ------------------------------------------------------------------------------ typed JSON

/// What a value's plain JSON reads back as, when it is not the value itself: a type name for
/// a scalar, an array of descriptions (null: as read) for an array, an object of the keys that
/// need one for a table; `None` when the plain JSON reads back as this very value.
fn type_of(v: &AMQPValue) -> Option<Value> {
    let name = match v {
        AMQPValue::Double(x) if !x.is_finite() => "double",
        AMQPValue::Boolean(_)
        | AMQPValue::LongLongInt(_)
        | AMQPValue::Double(_)
        | AMQPValue::Void => return None,
        AMQPValue::LongString(s) if std::str::from_utf8(s.as_bytes()).is_ok() => return None,
        AMQPValue::LongString(_) => "longstr-base64",
        AMQPValue::ByteArray(b) if std::str::from_utf8(b.as_slice()).is_err() => "bytes-base64",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::Float(_) => "float",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::ByteArray(_) => "bytes",
        AMQPValue::DecimalValue(d) => return Some(Value::String(format!("decimal:{}", d.scale))),
        AMQPValue::FieldArray(a) => {
            let items: Vec<Value> = a
                .as_slice()
                .iter()
                .map(|v| type_of(v).unwrap_or(Value::Null))
                .collect();
            return items
                .iter()
                .any(|t| !t.is_null())
                .then_some(Value::Array(items));
        }
        AMQPValue::FieldTable(t) => return types_of(t),
    };
    Some(Value::String(name.into()))
}

/// The types of `t`'s values that its plain JSON ([`table_to_json`]) loses, by key; `None`
/// when it loses none.
pub fn types_of(t: &FieldTable) -> Option<Value> {
    let mut map = Map::new();
    for (k, v) in t.inner() {
        if let Some(t) = type_of(v) {
            map.insert(k.as_str().to_owned(), t);
        }
    }
    (!map.is_empty()).then_some(Value::Object(map))
}

/// A number, or the name [`stored_value_json`] gives one that JSON has no number for.
fn float(v: &Value) -> Result<f64, String> {
    match v.as_str() {
        Some("NaN") => Ok(f64::NAN),
        Some("Infinity") => Ok(f64::INFINITY),
        Some("-Infinity") => Ok(f64::NEG_INFINITY),
        _ => v.as_f64().ok_or_else(|| format!("{v} is not a number")),
    }
}

fn base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))
}

/// A value as [`typed_table_json`] writes it: as [`value_to_json`] does, but bytes that are
/// not UTF-8 in base64 (their type says so), so that nothing is lost.
fn stored_value_json(v: &AMQPValue) -> Value {
    use base64::Engine;
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    match v {
        AMQPValue::LongString(s) if std::str::from_utf8(s.as_bytes()).is_err() => b64(s.as_bytes()),
        AMQPValue::ByteArray(b) if std::str::from_utf8(b.as_slice()).is_err() => b64(b.as_slice()),
        AMQPValue::FieldArray(a) => {
            Value::Array(a.as_slice().iter().map(stored_value_json).collect())
        }
        AMQPValue::FieldTable(t) => typed_table_json(t).0,
        AMQPValue::Float(x) if !x.is_finite() => non_finite(f64::from(*x)),
        AMQPValue::Double(x) if !x.is_finite() => non_finite(*x),
        other => value_to_json(other),
    }
}

/// A number JSON cannot hold, by name.
fn non_finite(x: f64) -> Value {
    Value::String(
        if x.is_nan() {
            "NaN"
        } else if x > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        }
        .into(),
    )
}

/// A table as plain JSON that loses nothing, with the types it does not tell ([`types_of`]):
/// what [`typed_table`] reads back as the same table.
pub fn typed_table_json(t: &FieldTable) -> (Value, Option<Value>) {
    let mut map = Map::new();
    for (k, v) in t.inner() {
        map.insert(k.as_str().to_owned(), stored_value_json(v));
    }
    (Value::Object(map), types_of(t))
}

/// An integer of a narrower type than JSON's.
fn narrow<T: TryFrom<i64>>(v: &Value, name: &str) -> Result<T, String> {
    v.as_i64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("{v} is not an integer of type {name}"))
}

/// A value's plain JSON read back with its description from [`type_of`].
fn typed_value(v: &Value, ty: Option<&Value>, depth: usize) -> Result<AMQPValue, String> {
    let text =
        || -> Result<&str, String> { v.as_str().ok_or_else(|| format!("{v} is not a string")) };
    Ok(match ty {
        None | Some(Value::Null) => value_at(v, depth).map_err(str::to_owned)?,
        Some(Value::String(name)) => match name.as_str() {
            "byte" => AMQPValue::ShortShortInt(narrow(v, name)?),
            "unsignedbyte" => AMQPValue::ShortShortUInt(narrow(v, name)?),
            "short" => AMQPValue::ShortInt(narrow(v, name)?),
            "unsignedshort" => AMQPValue::ShortUInt(narrow(v, name)?),
            "signedint" => AMQPValue::LongInt(narrow(v, name)?),
            "unsignedint" => AMQPValue::LongUInt(narrow(v, name)?),
            "timestamp" => AMQPValue::Timestamp(
                v.as_u64()
                    .ok_or_else(|| format!("{v} is not a timestamp"))?,
            ),
            // An f32 widened to f64 narrows back to itself.
            "float" => AMQPValue::Float(float(v)? as f32),
            "double" => AMQPValue::Double(float(v)?),
            "shortstr" if text()?.len() > 255 => {
                return Err(format!("{v} is longer than a shortstr's 255 bytes"));
            }
            "shortstr" => AMQPValue::ShortString(text()?.into()),
            "bytes" => AMQPValue::ByteArray(text()?.as_bytes().to_vec().into()),
            // Written so by earlier builds, the bytes already lost.
            "bytes-longstr" => AMQPValue::LongString(text()?.as_bytes().into()),
            "bytes-base64" => AMQPValue::ByteArray(base64(text()?)?.into()),
            "longstr-base64" => AMQPValue::LongString(base64(text()?)?.as_slice().into()),
            other => match other.strip_prefix("decimal:").map(str::parse::<u8>) {
                Some(Ok(scale)) => {
                    let n = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
                    let value = (n * 10f64.powi(i32::from(scale))).round();
                    if !(0.0..=f64::from(u32::MAX)).contains(&value) {
                        return Err(format!("{v} is not a decimal of scale {scale}"));
                    }
                    AMQPValue::DecimalValue(amq_protocol::types::DecimalValue {
                        scale,
                        value: value as u32,
                    })
                }
                _ => return Err(format!("unknown field type {other:?}")),
            },
        },
        Some(Value::Array(types)) => {
            let Value::Array(items) = v else {
                return Err(format!("{v} is not an array"));
            };
            if depth >= MAX_TABLE_DEPTH {
                return Err(TOO_DEEP.into());
            }
            let mut a = FieldArray::default();
            for (i, item) in items.iter().enumerate() {
                a.push(typed_value(item, types.get(i), depth + 1)?);
            }
            AMQPValue::FieldArray(a)
        }
        Some(Value::Object(types)) => {
            let Value::Object(o) = v else {
                return Err(format!("{v} is not an object"));
            };
            AMQPValue::FieldTable(typed_at(o, Some(types), depth + 1)?)
        }
        Some(other) => return Err(format!("{other} is not a field type")),
    })
}

fn typed_at(
    o: &Map<String, Value>,
    types: Option<&Map<String, Value>>,
    depth: usize,
) -> Result<FieldTable, String> {
    if depth > MAX_TABLE_DEPTH {
        return Err(TOO_DEEP.into());
    }
    let mut t = FieldTable::default();
    for (k, v) in o {
        if k.len() > 255 {
            return Err(format!("{k}: key longer than 255 bytes"));
        }
        let value =
            typed_value(v, types.and_then(|t| t.get(k)), depth).map_err(|e| format!("{k}: {e}"))?;
        t.insert(k.as_str().into(), value);
    }
    Ok(t)
}

/// A table's plain JSON read back with the types [`types_of`] gave for it: the table itself.
pub fn typed_table(o: &Map<String, Value>, types: Option<&Value>) -> Result<FieldTable, String> {
    match types {
        None | Some(Value::Null) => typed_at(o, None, 1),
        Some(Value::Object(types)) => typed_at(o, Some(types), 1),
        Some(other) => Err(format!("{other} is not a table's field types")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_round_trip() {
        let j = json!({"x-max-length": 10, "s": "v", "b": true, "f": 1.5, "a": [1, "x"], "t": {"k": null}});
        let t = json_to_table(j.as_object().unwrap()).unwrap();
        assert_eq!(
            t.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(table_to_json(&t), j);
        let big = json!({"n": u64::MAX});
        assert!(json_to_table(big.as_object().unwrap()).is_err());
    }

    #[test]
    fn typed_tables_read_back_as_they_were() {
        let mut inner = FieldTable::default();
        inner.insert("s".into(), AMQPValue::ShortInt(-3));
        inner.insert("plain".into(), AMQPValue::LongString("x".into()));
        let mut array = FieldArray::default();
        array.push(AMQPValue::LongLongInt(1));
        array.push(AMQPValue::ShortString("short".into()));
        let mut t = FieldTable::default();
        for (k, v) in [
            ("b", AMQPValue::ShortShortInt(-1)),
            ("ub", AMQPValue::ShortShortUInt(200)),
            ("us", AMQPValue::ShortUInt(60000)),
            ("i", AMQPValue::LongInt(-70000)),
            ("ui", AMQPValue::LongUInt(4_000_000_000)),
            ("l", AMQPValue::LongLongInt(i64::MIN)),
            ("ts", AMQPValue::Timestamp(1_700_000_000)),
            ("f", AMQPValue::Float(0.1)),
            ("d", AMQPValue::Double(0.1)),
            (
                "dec",
                AMQPValue::DecimalValue(amq_protocol::types::DecimalValue {
                    scale: 2,
                    value: 12345,
                }),
            ),
            ("ss", AMQPValue::ShortString("a".into())),
            ("ls", AMQPValue::LongString("b".into())),
            ("bin", AMQPValue::ByteArray(b"raw".to_vec().into())),
            ("raw", AMQPValue::ByteArray(vec![0xff, 0x00, 0xfe].into())),
            ("rawstr", AMQPValue::LongString(vec![0xc3, 0x28][..].into())),
            ("v", AMQPValue::Void),
            ("inf", AMQPValue::Float(f32::INFINITY)),
            ("-inf", AMQPValue::Double(f64::NEG_INFINITY)),
            ("yes", AMQPValue::Boolean(true)),
            ("arr", AMQPValue::FieldArray(array)),
            ("tab", AMQPValue::FieldTable(inner)),
        ] {
            t.insert(k.into(), v);
        }
        let (plain, types) = typed_table_json(&t);
        let back = typed_table(plain.as_object().unwrap(), types.as_ref()).unwrap();
        // Through text too, as a file holds it.
        let text = serde_json::to_string(&(plain.clone(), types.clone())).unwrap();
        let (plain2, types2): (Value, Option<Value>) = serde_json::from_str(&text).unwrap();
        assert_eq!(
            typed_table(plain2.as_object().unwrap(), types2.as_ref()).unwrap(),
            t
        );
        assert_eq!(back, t);
        // Not a number, too.
        let mut nan = FieldTable::default();
        nan.insert("nan".into(), AMQPValue::Double(f64::NAN));
        let (plain_nan, types_nan) = typed_table_json(&nan);
        let back_nan = typed_table(plain_nan.as_object().unwrap(), types_nan.as_ref()).unwrap();
        assert!(matches!(back_nan.inner().get("nan"), Some(AMQPValue::Double(x)) if x.is_nan()));
        // Only what the plain JSON loses is written.
        let types = types.unwrap();
        assert_eq!(types["b"], "byte");
        assert_eq!(types["arr"], json!([null, "shortstr"]));
        assert_eq!(types["tab"], json!({"s": "short"}));
        for plain in ["l", "d", "ls", "v", "yes"] {
            assert!(types.get(plain).is_none(), "{plain} needs no type");
        }
        // A table of JSON's own types needs none, and a wrong type is an error, not a guess.
        let mut simple = FieldTable::default();
        simple.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
        assert_eq!(types_of(&simple), None);
        let wrong = json!({"b": "byte"});
        assert!(typed_table(json!({"b": 300}).as_object().unwrap(), Some(&wrong)).is_err());
        let long = "x".repeat(256);
        let short = json!({"s": "shortstr"});
        assert!(typed_table(json!({"s": long}).as_object().unwrap(), Some(&short)).is_err());
        assert!(typed_table(json!({ long.clone(): 1 }).as_object().unwrap(), None).is_err());
    }
}
