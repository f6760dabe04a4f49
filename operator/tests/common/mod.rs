//! A real broker for the operator's tests: in-process, on 127.0.0.1 with ephemeral ports and a
//! temporary data directory, and a management API client for it.
#![allow(dead_code)]

pub mod k8s;

use warren_operator::broker_api::BrokerApi;

pub struct Broker {
    running: Option<warren_broker::RunningBroker>,
    _data: tempfile::TempDir,
}

impl Broker {
    pub async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let config = warren_broker::Config {
            data_dir: data.path().to_path_buf(),
            amqp_listen: "127.0.0.1:0".parse().unwrap(),
            management_listen: "127.0.0.1:0".parse().unwrap(),
            prometheus_listen: "127.0.0.1:0".parse().unwrap(),
            cluster_listen: "127.0.0.1:0".parse().unwrap(),
            ..warren_broker::Config::default()
        };
        let running = warren_broker::start(config).await.expect("broker starts");
        Self {
            running: Some(running),
            _data: data,
        }
    }

    pub fn management_addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().unwrap().management_addr
    }

    /// A client with the default user's credentials.
    pub fn api(&self) -> BrokerApi {
        BrokerApi::new(
            &format!("http://{}", self.management_addr()),
            "guest",
            "guest",
        )
    }

    /// GET on the management API: status and JSON body (null when none).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.management_addr()))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            // The runtime is ending with the test: a background shutdown is enough.
            tokio::spawn(r.shutdown());
        }
    }
}
