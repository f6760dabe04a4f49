//! AMQP field tables and values as JSON, the way RabbitMQ's management API shows them:
//! integers as numbers, strings as strings, tables as objects; JSON integers become signed
//! 64-bit `long`s, as RabbitMQ makes them.

use super::error::ApiError;
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

pub fn table_error(field: &str, e: Unrepresentable) -> ApiError {
    ApiError::bad_request(format!(
        "invalid value for '{}' in '{field}': {}",
        e.key, e.why
    ))
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
}
