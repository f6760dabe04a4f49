//! The two Services: a headless one that gives each broker a stable DNS name (peers find each
//! other through it), and the client Service applications connect through.

use super::{
    AMQP_PORT, AMQPS_PORT, CLUSTER_PORT, MANAGEMENT_PORT, MANAGEMENT_TLS_PORT, METRICS_PORT,
    client_service_name, headless_service_name, owned_meta, selector_labels,
};
use crate::crd::Instance;
use crate::crd::instance::ServiceType;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn port(name: &str, number: i32, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".into()),
        app_protocol: app_protocol.map(str::to_owned),
        ..ServicePort::default()
    }
}

/// The ports a broker serves, named as the StatefulSet's container ports are.
pub fn ports(instance: &Instance) -> Vec<ServicePort> {
    let mut ports = vec![
        port("amqp", AMQP_PORT, Some("amqp")),
        port("management", MANAGEMENT_PORT, Some("http")),
        port("prometheus", METRICS_PORT, Some("http")),
    ];
    if instance.spec.tls.is_some() {
        ports.insert(1, port("amqps", AMQPS_PORT, Some("amqps")));
        ports.push(port("management-tls", MANAGEMENT_TLS_PORT, Some("https")));
    }
    ports
}

pub fn client_service(instance: &Instance) -> Service {
    let mut metadata = owned_meta(instance, client_service_name(instance));
    if !instance.spec.service.annotations.is_empty() {
        metadata.annotations = Some(instance.spec.service.annotations.clone());
    }
    let service_type = match instance.spec.service.service_type {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(service_type.into()),
            selector: Some(selector_labels(instance)),
            ports: Some(ports(instance)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Headless, and publishing brokers before they are ready: peers must find each other to
/// become ready at all.
pub fn headless_service(instance: &Instance) -> Service {
    Service {
        metadata: owned_meta(instance, headless_service_name(instance)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(instance)),
            ports: Some(node_ports(instance)),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// A broker pod's ports: the client ones and the cluster port.
pub fn node_ports(instance: &Instance) -> Vec<ServicePort> {
    let mut ports = ports(instance);
    ports.push(port("cluster", CLUSTER_PORT, None));
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::instance;

    fn port_numbers(s: &Service) -> Vec<(String, i32)> {
        s.spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect()
    }

    #[test]
    fn the_client_service_exposes_amqp_management_and_metrics() {
        let s = client_service(&instance("  replicas: 1\n"));
        assert_eq!(s.metadata.name.as_deref(), Some("demo"));
        assert_eq!(
            port_numbers(&s),
            [
                ("amqp".to_owned(), 5672),
                ("management".to_owned(), 15672),
                ("prometheus".to_owned(), 15692)
            ]
        );
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector.unwrap()["app.kubernetes.io/instance"], "demo");
    }

    #[test]
    fn tls_adds_its_ports_and_the_service_takes_type_and_annotations() {
        let s = client_service(&instance(
            "  tls:\n    secretName: t\n  service:\n    type: LoadBalancer\n    annotations:\n      a: b\n",
        ));
        let ports = port_numbers(&s);
        assert!(ports.contains(&("amqps".to_owned(), 5671)));
        assert!(ports.contains(&("management-tls".to_owned(), 15671)));
        assert_eq!(s.metadata.annotations.unwrap()["a"], "b");
        assert_eq!(s.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));
    }

    #[test]
    fn the_headless_service_publishes_not_ready_brokers() {
        let s = headless_service(&instance("  replicas: 3\n"));
        assert_eq!(s.metadata.name.as_deref(), Some("demo-nodes"));
        let spec = s.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
    }
}
