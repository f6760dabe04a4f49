//! The list features of RabbitMQ's management API: `sort` and `sort_reverse`, `columns`, and
//! pagination (`page`, `page_size`, `name`, `use_regex`). A list is rendered item by item as
//! its body is sent, so a listing of many objects never holds all of their JSON at once.

use super::error::{ApiError, ApiResult, ok};
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Frame;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::OwnedSemaphorePermit;

pub type Query = HashMap<String, String>;

const MAX_PAGE_SIZE: usize = 500;
const DEFAULT_PAGE_SIZE: usize = 100;
/// Bytes of JSON rendered into one piece of a streamed list.
const CHUNK_BYTES: usize = 32 * 1024;

/// Answers a list as RabbitMQ does, with the query's sorting, paging and columns applied.
/// Items are sorted by name unless the query says otherwise.
pub fn respond(items: Vec<Value>, query: &Query) -> ApiResult<Response> {
    respond_with(items, value_name, Value::clone, query, None)
}

fn value_name(v: &Value) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or("")
}

/// Answers a list of objects that are rendered as JSON only as they are sent: `name` gives an
/// item's name (for sorting and the `name` filter) without rendering it. `permit`, if any, is
/// held until the body has been sent.
pub fn respond_with<T, R>(
    mut items: Vec<T>,
    name: fn(&T) -> &str,
    render: R,
    query: &Query,
    permit: Option<OwnedSemaphorePermit>,
) -> ApiResult<Response>
where
    T: Send + Unpin + 'static,
    R: Fn(&T) -> Value + Send + Sync + 'static,
{
    let page = match query.get("page") {
        None => None,
        // Wider than any list's page count, so that a huge page (which RabbitMQ answers as
        // out of range) is not taken for a malformed one.
        Some(p) => Some(
            p.parse::<i128>()
                .map_err(|_| ApiError::bad_request("Pagination parameters are invalid"))?,
        ),
    };
    let sort_key = query.get("sort").map(String::as_str).unwrap_or("name");
    if sort_key == "name" {
        items.sort_by(|a, b| name(a).cmp(name(b)));
    } else if !sort_key.is_empty() {
        // Only the sort key of each item is kept, not the item's whole JSON.
        let mut keyed: Vec<(Option<Value>, T)> = items
            .into_iter()
            .map(|i| (lookup(&render(&i), sort_key).cloned(), i))
            .collect();
        keyed.sort_by(|a, b| compare(a.0.as_ref(), b.0.as_ref()));
        items = keyed.into_iter().map(|(_, i)| i).collect();
    }
    if query.get("sort_reverse").is_some_and(|v| v == "true") {
        items.reverse();
    }
    let page_query = query.clone();
    let query = query.clone();
    let render = move |item: &T| columns(render(item), &query);
    match page {
        Some(page) => Ok(ok(paginate(items, name, &render, page, &page_query)?)),
        None => Ok(stream(
            items.into_iter(),
            Box::new(move |item: &T, out: &mut dyn FnMut(Value)| out(render(item))),
            permit,
        )),
    }
}

/// What renders one item of a streamed list into one or more JSON objects.
pub type RenderMany<T> = Box<dyn Fn(&T, &mut dyn FnMut(Value)) + Send + Sync>;

fn paginate<T>(
    items: Vec<T>,
    name: fn(&T) -> &str,
    render: &dyn Fn(&T) -> Value,
    page: i128,
    query: &Query,
) -> ApiResult<Value> {
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
            StatusCode::BAD_REQUEST,
            "invalid_pagination_parameters",
            format!(
                "Invalid pagination parameters: page number {page}, page size {}",
                size.map_or("undefined".to_owned(), |s| s.to_string())
            ),
        ));
    }
    let size = size.map_or(DEFAULT_PAGE_SIZE, |s| s as usize);
    let total = items.len();
    let filtered: Vec<T> = match query.get("name").filter(|n| !n.is_empty()) {
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
            items.into_iter().filter(|i| matcher(name(i))).collect()
        }
    };
    let filtered_count = filtered.len();
    // As in RabbitMQ: an empty list has no pages.
    let page_count = filtered_count.div_ceil(size);
    // Checked: a page far past the end must not wrap round to a real one.
    let start = usize::try_from(page - 1)
        .ok()
        .and_then(|p| p.checked_mul(size));
    let Some(start) = start.filter(|&s| s == 0 || s < filtered_count) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "page_out_of_range",
            format!("Page out of range, page: {page} page size: {size}, len: {filtered_count}"),
        ));
    };
    let page_items: Vec<Value> = filtered.iter().skip(start).take(size).map(render).collect();
    Ok(json!({
        "filtered_count": filtered_count,
        "item_count": page_items.len(),
        "items": page_items,
        "page": start / size + 1,
        "page_count": page_count,
        "page_size": size,
        "total_count": total,
    }))
}

/// A JSON array whose items are rendered as the body is sent (and taken from `items` only
/// then). A list that fits in one piece is sent whole, with its length.
pub fn stream<T: Send + Unpin + 'static>(
    items: impl Iterator<Item = T> + Send + 'static,
    render: RenderMany<T>,
    permit: Option<OwnedSemaphorePermit>,
) -> Response {
    let mut body = ListBody {
        items: Box::new(items),
        render,
        opened: false,
        started: false,
        done: false,
        _permit: permit,
    };
    let first = body.next_piece();
    let body = if body.done {
        Body::from(first)
    } else {
        Body::new(Prefixed {
            first: Some(first),
            rest: body,
        })
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

struct ListBody<T> {
    items: Box<dyn Iterator<Item = T> + Send>,
    render: RenderMany<T>,
    opened: bool,
    /// An object has been written (the next one needs a comma).
    started: bool,
    done: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<T> ListBody<T> {
    /// The next piece of the array: about [`CHUNK_BYTES`] of rendered items.
    fn next_piece(&mut self) -> Bytes {
        let mut buf = Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4);
        if !self.opened {
            buf.push(b'[');
            self.opened = true;
        }
        while buf.len() < CHUNK_BYTES {
            let Some(item) = self.items.next() else {
                buf.push(b']');
                self.done = true;
                self._permit = None;
                break;
            };
            let started = &mut self.started;
            (self.render)(&item, &mut |value| {
                if *started {
                    buf.push(b',');
                }
                *started = true;
                // Writing a `Value` into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut buf, &value);
            });
        }
        Bytes::from(buf)
    }
}

/// The first piece (already rendered, to learn whether there are more) and then the rest.
struct Prefixed<T> {
    first: Option<Bytes>,
    rest: ListBody<T>,
}

impl<T: Unpin> http_body::Body for Prefixed<T> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if this.rest.done {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.rest.next_piece()))))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.done
    }
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

    fn page(items: Vec<Value>, page: i128, query: &Query) -> ApiResult<Value> {
        paginate(items, value_name, &Value::clone, page, query)
    }

    #[test]
    fn pages_and_their_errors() {
        let items: Vec<Value> = (0..4).map(|i| json!({"name": format!("q{i}")})).collect();
        let p = page(items.clone(), 2, &q(&[("page_size", "3")])).unwrap();
        assert_eq!(p["item_count"], 1);
        assert_eq!(p["page_count"], 2);
        assert_eq!(p["total_count"], 4);
        assert!(page(items.clone(), 99, &q(&[("page_size", "2")])).is_err());
        assert!(page(items.clone(), 0, &q(&[])).is_err());
        assert!(page(items.clone(), 1, &q(&[("page_size", "600")])).is_err());
        let huge = page(items.clone(), i64::MAX.into(), &q(&[("page_size", "100")]));
        let huge = huge.unwrap_err().into_response();
        assert_eq!(huge.status(), StatusCode::BAD_REQUEST);
        let huge = page(items.clone(), i128::MAX, &q(&[("page_size", "500")]));
        assert_eq!(
            huge.unwrap_err().into_response().status(),
            StatusCode::BAD_REQUEST
        );
        let filtered = page(items, 1, &q(&[("name", "q1")])).unwrap();
        assert_eq!(filtered["filtered_count"], 1);
        assert_eq!(page(Vec::new(), 1, &q(&[])).unwrap()["page_count"], 0);
    }

    #[test]
    fn a_long_list_is_rendered_piece_by_piece() {
        let items: Vec<u32> = (0..10_000).collect();
        let mut body = ListBody {
            items: Box::new(items.into_iter()),
            render: Box::new(|i: &u32, out: &mut dyn FnMut(Value)| {
                out(json!({"name": format!("item-{i}")}))
            }),
            opened: false,
            started: false,
            done: false,
            _permit: None,
        };
        let mut pieces = Vec::new();
        while !body.done {
            pieces.push(body.next_piece());
        }
        assert!(pieces.len() > 1, "{}", pieces.len());
        assert!(pieces.iter().all(|p| p.len() < 2 * CHUNK_BYTES));
        let whole: Vec<u8> = pieces.concat();
        let parsed: Vec<Value> = serde_json::from_slice(&whole).unwrap();
        assert_eq!(parsed.len(), 10_000);
        assert_eq!(parsed[9_999]["name"], "item-9999");
    }
}
