//! An in-process SPIFFE Workload API (X.509 profile only) fed by a `watch` channel.
//!
//! spiffe-rustls builds its TLS configuration from a `spiffe::X509Source`, which talks to a
//! Workload API. For the `dev` and `files` sources the broker serves that API to itself over an
//! in-memory duplex pipe — never a socket on disk, which would hand the key to anyone who can
//! connect — so all three sources reach TLS through the same verifier and the same rotation
//! path: pushing new material into the channel is a rotation.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::IdentityError;

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    reason = "generated code of the Workload API protos"
)]
mod pb {
    tonic::include_proto!("_");
}

/// DER material for one SVID and its bundle.
#[derive(Clone)]
pub struct Material {
    pub spiffe_id: String,
    /// DER certificates, leaf first, concatenated.
    pub chain_der: Vec<u8>,
    /// PKCS#8 DER private key.
    pub key_der: zeroize::Zeroizing<Vec<u8>>,
    /// DER CA certificates of the own trust domain, concatenated.
    pub bundle_der: Vec<u8>,
    /// Federated trust domains (`spiffe://td`) and their DER CA certificates, concatenated.
    pub federated: std::collections::BTreeMap<String, Vec<u8>>,
}

struct Service {
    rx: watch::Receiver<Option<Material>>,
}

/// What `X509SourceBuilder::client_factory` takes: a maker of Workload API clients.
type ClientFactory = Arc<
    dyn Fn() -> Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<spiffe::WorkloadApiClient, spiffe::WorkloadApiError>,
                    > + Send,
            >,
        > + Send
        + Sync,
>;

type SvidStream = Pin<Box<dyn Stream<Item = Result<pb::X509svidResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for Service {
    type FetchX509SVIDStream = SvidStream;

    async fn fetch_x509svid(
        &self,
        _request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.rx.clone());
        let out = futures::StreamExt::filter_map(stream, |m| async move {
            m.map(|m| {
                Ok(pb::X509svidResponse {
                    svids: vec![pb::X509svid {
                        spiffe_id: m.spiffe_id,
                        x509_svid: m.chain_der,
                        x509_svid_key: m.key_der.to_vec(),
                        bundle: m.bundle_der,
                        hint: String::new(),
                    }],
                    crl: vec![],
                    federated_bundles: m.federated.into_iter().collect(),
                })
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Builds an `X509Source` served from `rx` in process.
pub async fn source(
    rx: watch::Receiver<Option<Material>>,
) -> Result<spiffe::X509Source, IdentityError> {
    let svc = pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(Service { rx });
    let channel = tonic::transport::Endpoint::from_static("http://inprocess.invalid")
        .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
            let svc = svc.clone();
            async move {
                let (client, server) = tokio::io::duplex(64 * 1024);
                tokio::spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(svc)
                        .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server)))
                        .await;
                });
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
            }
        }));
    let endpoint = spiffe::transport::Endpoint::parse("unix:///in-process/workload-api")
        .map_err(|e| IdentityError::Source(format!("in-process endpoint: {e}")))?;
    let factory: ClientFactory = Arc::new(move || {
        let channel = channel.clone();
        let endpoint = endpoint.clone();
        Box::pin(async move {
            Ok(spiffe::WorkloadApiClient::new_with_channel(
                endpoint, channel,
            ))
        })
    });
    spiffe::X509Source::builder()
        .client_factory(factory)
        .build()
        .await
        .map_err(|e| IdentityError::Source(format!("in-process Workload API: {e}")))
}
