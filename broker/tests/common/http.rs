//! A small client for the management API: requests with Basic auth, answers as (status,
//! headers, JSON or empty).
#![allow(dead_code)]

use super::TestBroker;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub struct Api {
    pub base: String,
    client: reqwest::Client,
    user: Option<(String, String)>,
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    /// Asserts the status and RabbitMQ's error body.
    pub fn error(&self, status: u16, error: &str) -> Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        assert_eq!(
            self.headers
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            Some("application/json")
        );
        let body = self.json();
        assert_eq!(body["error"], error, "{body}");
        body["reason"].clone()
    }

    pub fn status(&self, status: u16) -> &Self {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        self
    }
}

impl Api {
    /// The broker's management API; for an external broker, `WARREN_TEST_HTTP_URL` (for
    /// instance RabbitMQ's `http://127.0.0.1:15672`).
    pub fn new(broker: &TestBroker) -> Self {
        if broker.is_external()
            && let Ok(url) = std::env::var("WARREN_TEST_HTTP_URL")
        {
            return Self::at(url.trim_end_matches('/'));
        }
        Self::at(&format!("http://{}", broker.running().management_addr))
    }

    pub fn at(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            client: reqwest::Client::new(),
            user: Some(("guest".into(), "guest".into())),
        }
    }

    pub fn as_user(&self, user: &str, pass: &str) -> Self {
        Self {
            base: self.base.clone(),
            client: self.client.clone(),
            user: Some((user.into(), pass.into())),
        }
    }

    pub fn anonymous(&self) -> Self {
        Self {
            base: self.base.clone(),
            client: self.client.clone(),
            user: None,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some((u, p)) = &self.user {
            req = req.basic_auth(u, Some(p));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().await.expect("HTTP request");
        Answer {
            status: resp.status(),
            headers: resp.headers().clone(),
            text: resp.text().await.expect("HTTP body"),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, &[]).await
    }

    /// GET that must succeed, as JSON.
    pub async fn json(&self, path: &str) -> Value {
        let a = self.get(path).await;
        assert_eq!(a.status, StatusCode::OK, "GET {path}: {}", a.text);
        a.json()
    }

    pub async fn put(&self, path: &str, body: &str) -> Answer {
        self.send(Method::PUT, path, Some(body), &[]).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.send(Method::POST, path, Some(body), &[]).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None, &[]).await
    }
}
