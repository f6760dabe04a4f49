//! Request bodies: JSON objects read field by field with RabbitMQ's error texts where it has
//! them (`not_json`, `[{key_missing,read}]`, `["not_boolean","yes"]`), and a clear 400 where
//! RabbitMQ would answer 500 or silently ignore the field (wrong types, unknown fields).

use super::error::{ApiError, ApiResult};
use crate::store::field_json::{Unrepresentable, json_to_table, typed_table};
use amq_protocol::types::FieldTable;
use serde_json::{Map, Value};

/// A JSON object body, with the fields an endpoint accepts.
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
}

/// Parses a body; empty means `{}`, as in RabbitMQ.
pub fn parse(bytes: &[u8]) -> ApiResult<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(bytes).map_err(|_| ApiError::bad_request("not_json"))
}

impl Fields {
    /// Reads a body that must be a JSON object whose keys are all in `allowed`.
    pub fn from_body(bytes: &[u8], allowed: &[&str]) -> ApiResult<Self> {
        Self::from_value(parse(bytes)?, allowed)
    }

    pub fn from_value(value: Value, allowed: &[&str]) -> ApiResult<Self> {
        let map = match value {
            Value::Object(map) => map,
            Value::String(_) => {
                return Err(ApiError::bad_request(
                    "invalid payload: the request body JSON-decoded to a string. Is the input doubly-JSON-encoded?",
                ));
            }
            _ => return Err(ApiError::bad_request("not_json")),
        };
        let fields = Self { map };
        fields.check_known(allowed)?;
        Ok(fields)
    }

    /// Refuses fields the endpoint does not know: a misspelt field would otherwise be
    /// silently ignored (RabbitMQ ignores them; Warren says so).
    fn check_known(&self, allowed: &[&str]) -> ApiResult<()> {
        let mut unknown: Vec<&str> = self
            .map
            .keys()
            .map(String::as_str)
            .filter(|k| !allowed.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        Err(ApiError::bad_request(format!(
            "unknown field{} {}; accepted fields: {}",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", "),
            allowed.join(", ")
        )))
    }

    /// Fails with RabbitMQ's `[{key_missing,…}]` listing every absent key, in order.
    pub fn require(&self, keys: &[&str]) -> ApiResult<()> {
        let missing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !self.map.contains_key(*k))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ApiError::keys_missing(&missing))
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn wrong_type(key: &str, expected: &str, got: &Value) -> ApiError {
        ApiError::bad_request(format!(
            "field '{key}' must be {expected}, got {}",
            short(got)
        ))
    }

    /// A string field; `null` counts as absent.
    pub fn string(&self, key: &str) -> ApiResult<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Self::wrong_type(key, "a string", other)),
        }
    }

    /// A string field that may also be given as a number (routing keys, counts).
    pub fn stringish(&self, key: &str) -> ApiResult<Option<String>> {
        match self.map.get(key) {
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            _ => self.string(key),
        }
    }

    /// A boolean: `true`/`false`, or the strings `"true"`/`"false"` as RabbitMQ accepts.
    pub fn boolean(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(other) => Err(ApiError::bad_request(Value::Array(vec![
                "not_boolean".into(),
                other.clone(),
            ]))),
        }
    }

    /// An integer, or a string holding one (RabbitMQ accepts `"count":"1"`).
    pub fn integer(&self, key: &str) -> ApiResult<Option<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(Value::String(s)) if s.trim().parse::<i64>().is_ok() => {
                Ok(s.trim().parse::<i64>().ok())
            }
            Some(other) => Err(Self::wrong_type(key, "an integer", other)),
        }
    }

    /// An AMQP table given as a JSON object (`[]` and `null` are empty, as in RabbitMQ).
    pub fn table(&self, key: &str) -> ApiResult<FieldTable> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(FieldTable::default()),
            Some(Value::Array(a)) if a.is_empty() => Ok(FieldTable::default()),
            Some(Value::Object(o)) => json_to_table(o).map_err(|e| table_error(key, e)),
            Some(other) => Err(Self::wrong_type(key, "an object", other)),
        }
    }

    /// An object's `arguments`, with the types of `argument_types` where it has them (as
    /// Warren's definitions snapshot writes them, for what plain JSON loses).
    pub fn arguments(&self) -> ApiResult<FieldTable> {
        match (self.map.get("arguments"), self.map.get("argument_types")) {
            (Some(Value::Object(o)), Some(types)) => typed_table(o, Some(types))
                .map_err(|e| ApiError::bad_request(format!("invalid value in 'arguments': {e}"))),
            _ => self.table("arguments"),
        }
    }

    /// Tags: a comma-separated string (trimmed) or an array of strings.
    pub fn tags(&self, key: &str) -> ApiResult<Option<Vec<String>>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(split_tags(s))),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.trim().to_owned()),
                    other => Err(Self::wrong_type(key, "a list of strings", other)),
                })
                .filter(|t| !matches!(t, Ok(s) if s.is_empty()))
                .collect::<ApiResult<Vec<_>>>()
                .map(Some),
            Some(other) => Err(Self::wrong_type(
                key,
                "a comma-separated string or a list of strings",
                other,
            )),
        }
    }
}

pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A value, shortened for an error text.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 60 {
        format!("{}…", &text[..text.floor_char_boundary(60)])
    } else {
        text
    }
}

fn table_error(field: &str, e: Unrepresentable) -> ApiError {
    ApiError::bad_request(format!(
        "invalid value for '{}' in '{field}': {}",
        e.key, e.why
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(e: ApiError) -> Value {
        match e {
            ApiError::Json { reason, .. } => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bodies_are_objects_and_empty_is_empty() {
        assert!(Fields::from_body(b"", &[]).is_ok());
        assert_eq!(
            reason(Fields::from_body(b"{not json", &[]).unwrap_err()),
            json!("not_json")
        );
        assert_eq!(
            reason(Fields::from_body(b"[1,2]", &[]).unwrap_err()),
            json!("not_json")
        );
        assert!(
            reason(Fields::from_body(b"\"s\"", &[]).unwrap_err())
                .as_str()
                .unwrap()
                .contains("doubly-JSON-encoded")
        );
        let e = reason(Fields::from_body(br#"{"durabel":true}"#, &["durable"]).unwrap_err());
        assert!(e.as_str().unwrap().contains("'durabel'"), "{e}");
    }

    #[test]
    fn missing_keys_are_listed_in_order() {
        let f = Fields::from_body(br#"{"write":".*"}"#, &["configure", "write", "read"]).unwrap();
        assert_eq!(
            reason(f.require(&["configure", "write", "read"]).unwrap_err()),
            json!("[{key_missing,configure},{key_missing,read}]")
        );
    }

    #[test]
    fn typed_fields() {
        let f = Fields::from_body(
            br#"{"b":"yes","c":"true","n":"5","t":" a , b ","l":["x",""],"s":5}"#,
            &["b", "c", "n", "t", "l", "s"],
        )
        .unwrap();
        assert_eq!(
            reason(f.boolean("b").unwrap_err()),
            json!(["not_boolean", "yes"])
        );
        assert_eq!(f.boolean("c").unwrap(), Some(true));
        assert_eq!(f.integer("n").unwrap(), Some(5));
        assert_eq!(f.tags("t").unwrap(), Some(vec!["a".into(), "b".into()]));
        assert_eq!(f.tags("l").unwrap(), Some(vec!["x".into()]));
        assert!(f.string("s").is_err());
        assert_eq!(f.stringish("s").unwrap(), Some("5".into()));
    }
}
