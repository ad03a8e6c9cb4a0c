//! What a hostile network can do to the API port: crafted paths, floods of junk and of
//! unauthenticated requests, oversized messages, too many connections and streams. The broker
//! must keep its metrics readable and bounded, its disk use bounded, and keep serving the
//! legitimate agent.

mod common;

use common::*;
use jitbroker::api::pb;
use tonic::codegen::http::uri::PathAndQuery;

/// Calls `path` on `ch` with an empty message, whatever the path says.
async fn call_path(ch: &tonic::transport::Channel, path: &str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<pb::GetTaskRequest, pb::Task>::default();
    let path = PathAndQuery::try_from(path).expect("a path the http crate accepts");
    match grpc
        .unary(
            tonic::Request::new(pb::GetTaskRequest::default()),
            path,
            codec,
        )
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn crafted_paths_neither_break_the_exposition_nor_add_series() {
    let dir = dev_dir();
    let (r, _clock) = spawn_manual(dir.path()).await;
    let (chain, key, bundle) = mint(&r.data_dir, AGENT);
    let ch = channel(r.addr, tls_config(&bundle, Some((&chain, &key))))
        .await
        .unwrap();
    let series = |samples: &[Sample]| {
        let mut v: Vec<String> = samples
            .iter()
            .map(|(n, l, _)| format!("{n}{l:?}"))
            .collect();
        v.sort();
        v
    };
    let before = series(&scrape(&r).await);

    // Quotes and braces pass the http crate's path check; written into a label unescaped they
    // end the label early and leave the rest of the line as garbage.
    let crafted = [
        "/jitbroker.v1.Broker/GetTask\"}0\"{x=\"",
        "/jitbroker.v1.x\"}junk{a=\"",
        "/jitbroker.v1.Broker/GetTask/extra",
    ];
    for p in crafted {
        assert_eq!(call_path(&ch, p).await, tonic::Code::Unimplemented, "{p}");
    }
    for i in 0..200 {
        call_path(&ch, &format!("/jitbroker.v1.Broker/Random{i}")).await;
    }
    assert_eq!(
        call_path(&ch, "/jitbroker.v1.Broker/GetTask").await,
        tonic::Code::InvalidArgument
    );

    let after = scrape(&r).await;
    assert_eq!(series(&after), before, "the set of series changed");
    let count = |method: &str| {
        after
            .iter()
            .find(|(n, l, _)| {
                n == "jitbroker_request_duration_seconds_count"
                    && l == &[("method".to_owned(), method.to_owned())]
            })
            .map(|s| s.2)
    };
    assert_eq!(count("other"), Some(203.0));
    assert_eq!(count("jitbroker.v1.Broker/GetTask"), Some(1.0));
    r.stop().await;
}
