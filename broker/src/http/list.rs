//! The list features of RabbitMQ's management API: `sort` and `sort_reverse`, `columns`, and
//! pagination (`page`, `page_size`, `name`, `use_regex`).

use super::error::{ApiError, ApiResult, ok};
use axum::response::Response;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

pub type Query = HashMap<String, String>;

const MAX_PAGE_SIZE: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 100;

/// Answers a list as RabbitMQ does, with the query's sorting, paging and columns applied.
/// Items are sorted by name unless the query says otherwise.
pub fn respond(mut items: Vec<Value>, query: &Query) -> ApiResult<Response> {
    let sort_key = query.get("sort").map(String::as_str).unwrap_or("name");
    if !sort_key.is_empty() {
        items.sort_by(|a, b| compare(lookup(a, sort_key), lookup(b, sort_key)));
    }
    if query.get("sort_reverse").is_some_and(|v| v == "true") {
        items.reverse();
    }
    let page = match query.get("page") {
        None => None,
        Some(p) => Some(
            p.parse::<i64>()
                .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?,
        ),
    };
    let result = match page {
        None => Value::Array(items.into_iter().map(|i| columns(i, query)).collect()),
        Some(page) => paginate(items, page, query)?,
    };
    Ok(ok(result))
}

fn paginate(items: Vec<Value>, page: i64, query: &Query) -> ApiResult<Value> {
    let size = match query.get("page_size") {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?,
        ),
    };
    let size_ok = size.is_none_or(|s| s >= 1 && s as usize <= MAX_PAGE_SIZE);
    if page < 1 || !size_ok {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_pagination_parameters",
            format!(
                "Invalid pagination parameters: page number {page}, page size {}",
                size.map_or("undefined".to_owned(), |s| s.to_string())
            ),
        ));
    }
    let size = size.map_or(DEFAULT_PAGE_SIZE, |s| s as usize);
    let total = items.len();
    let filtered: Vec<Value> = match query.get("name").filter(|n| !n.is_empty()) {
        None => items,
        Some(pattern) => {
            let matcher: Box<dyn Fn(&str) -> bool> =
                if query.get("use_regex").is_some_and(|v| v == "true") {
                    let re = regex::Regex::new(pattern)
                        .map_err(|e| ApiError::bad_request(format!("invalid regex: {e}")))?;
                    Box::new(move |s| re.is_match(s))
                } else {
                    let p = pattern.clone();
                    Box::new(move |s| s.contains(&p))
                };
            items
                .into_iter()
                .filter(|i| i.get("name").and_then(Value::as_str).is_some_and(&matcher))
                .collect()
        }
    };
    let filtered_count = filtered.len();
    let page_count = filtered_count.div_ceil(size).max(1);
    let start = (page as usize - 1) * size;
    if start > 0 && start >= filtered_count {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "page_out_of_range",
            format!("Page out of range, page: {page} page size: {size}, len: {filtered_count}"),
        ));
    }
    let page_items: Vec<Value> = filtered
        .into_iter()
        .skip(start)
        .take(size)
        .map(|i| columns(i, query))
        .collect();
    Ok(json!({
        "filtered_count": filtered_count,
        "item_count": page_items.len(),
        "items": page_items,
        "page": page,
        "page_count": page_count,
        "page_size": size,
        "total_count": total,
    }))
}

/// `a.b.c` in nested objects.
fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

/// Keeps only the `columns` of an item (dotted paths into nested objects).
pub fn columns(item: Value, query: &Query) -> Value {
    let Some(cols) = query.get("columns").filter(|c| !c.is_empty()) else {
        return item;
    };
    let mut out = Map::new();
    for col in cols.split(',').map(str::trim) {
        let Some(v) = lookup(&item, col) else {
            continue;
        };
        let mut parts: Vec<&str> = col.split('.').collect();
        let last = parts.pop().unwrap_or(col);
        let mut target = &mut out;
        for p in parts {
            target = target
                .entry(p.to_owned())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("created as an object");
        }
        target.insert(last.to_owned(), v.clone());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Query {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn columns_keep_nested_paths() {
        let item = json!({"name": "q", "messages": 3, "message_stats": {"publish": 3, "ack": 1}});
        let out = columns(item, &q(&[("columns", "name,message_stats.publish,nope")]));
        assert_eq!(out, json!({"name": "q", "message_stats": {"publish": 3}}));
    }

    #[test]
    fn pages_and_their_errors() {
        let items: Vec<Value> = (0..4).map(|i| json!({"name": format!("q{i}")})).collect();
        let page = paginate(items.clone(), 2, &q(&[("page_size", "3")])).unwrap();
        assert_eq!(page["item_count"], 1);
        assert_eq!(page["page_count"], 2);
        assert_eq!(page["total_count"], 4);
        assert!(paginate(items.clone(), 99, &q(&[("page_size", "2")])).is_err());
        assert!(paginate(items.clone(), 0, &q(&[])).is_err());
        assert!(paginate(items.clone(), 1, &q(&[("page_size", "600")])).is_err());
        let filtered = paginate(items, 1, &q(&[("name", "q1")])).unwrap();
        assert_eq!(filtered["filtered_count"], 1);
    }
}
