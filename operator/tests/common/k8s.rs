//! A mocked Kubernetes API server (tower-test) for request-shape tests: take each request the
//! controller makes, look at it, answer it.

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::time::Duration;
use tower_test::mock::{self, Handle, SendResponse};

pub type ApiServer = Handle<Request<Body>, Response<Body>>;

/// A client talking to a fresh mocked API server.
pub fn mocked() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// A request as the server saw it.
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// The JSON body, null when none.
    pub body: Value,
}

/// The next request (within 5 s) and the way to answer it.
pub async fn next(server: &mut ApiServer) -> (Seen, SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is alive");
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let seen = Seen {
        method,
        path,
        query,
        body,
    };
    (seen, send)
}

pub fn answer(send: SendResponse<Response<Body>>, status: StatusCode, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

/// The API server's 404 body.
pub fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}
