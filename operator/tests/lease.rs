//! Leader election against a mocked API server: a free Lease is created, a fresh one held by
//! another replica is left alone, an expired one is taken over with the resourceVersion read
//! (so a racing replica loses with 409), the holder renews its own, and on a graceful shutdown
//! the holder releases it (as client-go's ReleaseOnCancel) so the next replica takes it at once.

mod common;

use common::k8s::{ApiServer, answer, mocked, next, not_found};
use http::{Method, StatusCode};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use std::time::Duration;
use warren_operator::lease::LeaseLock;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/warren-system/leases/warren-operator";

fn lock() -> (LeaseLock, ApiServer) {
    let (client, server) = mocked();
    let api = kube::Api::namespaced(client, "warren-system");
    (
        LeaseLock::new(api, "warren-operator", "pod-a", Duration::from_secs(15)),
        server,
    )
}

fn held_by(holder: &str, renewed: &str) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "warren-operator", "namespace": "warren-system", "resourceVersion": "41"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "acquireTime": "2026-11-25T10:00:00.000000Z", "renewTime": renewed,
                    "leaseTransitions": 3}})
}

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

#[tokio::test]
async fn a_free_lease_is_created_for_this_replica() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:00Z")).await });
    let (seen, send) = next(&mut server).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::GET, PATH));
    answer(send, StatusCode::NOT_FOUND, not_found());
    let (seen, send) = next(&mut server).await;
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 15);
    answer(send, StatusCode::CREATED, seen.body.clone());
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_fresh_lease_of_another_replica_is_left_alone() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:10Z")).await });
    let (seen, send) = next(&mut server).await;
    assert_eq!(seen.method, Method::GET);
    answer(
        send,
        StatusCode::OK,
        held_by("pod-b", "2026-11-25T10:00:00.000000Z"),
    );
    assert!(!run.await.unwrap().unwrap(), "5 s of the Lease are left");
    // No write was made: the client is gone (or silent) without another request.
    let more = tokio::time::timeout(Duration::from_millis(100), server.next_request()).await;
    assert!(
        !matches!(more, Ok(Some(_))),
        "no write to a Lease another replica holds"
    );
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_guarded_by_its_resource_version() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:20Z")).await });
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::OK,
        held_by("pod-b", "2026-11-25T10:00:00.000000Z"),
    );
    let (seen, send) = next(&mut server).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::PUT, PATH));
    assert_eq!(seen.body["metadata"]["resourceVersion"], "41");
    assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
    answer(send, StatusCode::OK, seen.body.clone());
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_replica_that_loses_the_race_does_not_lead() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:20Z")).await });
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::OK,
        held_by("pod-b", "2026-11-25T10:00:00.000000Z"),
    );
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
    );
    assert!(!run.await.unwrap().unwrap());
}

#[tokio::test]
async fn the_holder_renews_its_own_lease_keeping_its_acquire_time() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:05Z")).await });
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::OK,
        held_by("pod-a", "2026-11-25T10:00:00.000000Z"),
    );
    let (seen, send) = next(&mut server).await;
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.body["spec"]["leaseTransitions"], 3);
    assert_eq!(
        seen.body["spec"]["acquireTime"],
        "2026-11-25T10:00:00.000000Z"
    );
    assert_eq!(
        seen.body["spec"]["renewTime"],
        "2026-11-25T10:00:05.000000Z"
    );
    answer(send, StatusCode::OK, seen.body.clone());
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn the_holder_releases_its_lease_as_client_go_does() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.release(at("2026-11-25T10:00:07Z")).await });
    let (seen, send) = next(&mut server).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::GET, PATH));
    answer(
        send,
        StatusCode::OK,
        held_by("pod-a", "2026-11-25T10:00:05.000000Z"),
    );
    let (seen, send) = next(&mut server).await;
    assert_eq!((seen.method, seen.path.as_str()), (Method::PUT, PATH));
    // Guarded by the version read; no holder, a duration of 1 s, the transitions kept.
    assert_eq!(seen.body["metadata"]["resourceVersion"], "41");
    let spec = &seen.body["spec"];
    assert_eq!(spec["holderIdentity"], "");
    assert_eq!(spec["leaseDurationSeconds"], 1);
    assert_eq!(spec["leaseTransitions"], 3);
    assert_eq!(spec["renewTime"], "2026-11-25T10:00:07.000000Z");
    answer(send, StatusCode::OK, seen.body.clone());
    assert!(run.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_lease_another_replica_holds_is_not_released() {
    let (lock, mut server) = lock();
    let run = tokio::spawn(async move { lock.release(at("2026-11-25T10:00:07Z")).await });
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::OK,
        held_by("pod-b", "2026-11-25T10:00:05.000000Z"),
    );
    assert!(!run.await.unwrap().unwrap());
    let more = tokio::time::timeout(Duration::from_millis(100), server.next_request()).await;
    assert!(
        !matches!(more, Ok(Some(_))),
        "no write to a Lease another replica holds"
    );
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_not_when_it_expires() {
    let (lock, mut server) = lock();
    // Released a moment ago: by its times still valid, but it has no holder.
    let run = tokio::spawn(async move { lock.try_acquire(at("2026-11-25T10:00:07.5Z")).await });
    let (_, send) = next(&mut server).await;
    let mut released = held_by("", "2026-11-25T10:00:07.000000Z");
    released["spec"]["leaseDurationSeconds"] = json!(1);
    answer(send, StatusCode::OK, released);
    let (seen, send) = next(&mut server).await;
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(seen.body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(seen.body["spec"]["leaseTransitions"], 4);
    answer(send, StatusCode::OK, seen.body.clone());
    assert!(run.await.unwrap().unwrap());
}
