//! jitbroker: a SPIFFE-native just-in-time secrets broker for AI agents.
//!
//! An agent proves what it is with a SPIFFE SVID, declares a task, and receives credentials scoped
//! to that task that live for minutes and die when the task ends.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`serve`, `dev`, `dev-svid`, `check-config`, `policy`).
//! - [`config`]: the TOML configuration, environment overrides, validation.
//! - [`error`]: the error type and the one mapping from errors to gRPC status.
//! - [`server`]: assembles the broker and serves the API (mTLS gRPC) and ops (HTTP) ports;
//!   `server/limits.rs` holds the API port's limits (connections, idle connections, requests at
//!   once, request time and size, rate per remote address).
//! - [`api`]: the gRPC services; the only code that touches tonic and prost types. Besides
//!   gRPC: `api::forward_auth` (HTTP forward auth for nginx, Caddy, Traefik) and `api::oauth`
//!   (the OAuth surface: discovery, JWKS, token endpoint, introspection, revocation; its
//!   listener is `server::serve_oauth`).
//! - [`identity`]: where SVIDs come from (SPIRE, files, dev CA) and how TLS uses them.
//! - [`policy`]: Cedar policies, decided at request time.
//! - [`broker`]: tasks, credentials, expiry and the reaper; no tonic, no sled. Tool calls that
//!   gateways ask about are decided in `broker::tool_calls`; OAuth grants are mapped onto tasks
//!   and credentials in `broker::oauth`; approvals in `broker::approvals`, delegation in
//!   `broker::delegation`, upstream accounts and their revocation queue (retried until done) in
//!   `broker::upstream`, the reaper in `broker::reaper`, retention and audit archival in
//!   `broker::retention`, operator calls in `broker::admin`.
//! - [`gateway`]: enforcement at the point of tool use: the `[gateway]` configuration and the
//!   routing of HTTP and MCP calls to grants; `api::ext_authz` speaks Envoy's protocol.
//! - [`issuers`]: the credential kinds (opaque tokens, JWTs, X.509 certificates from per-resource
//!   CAs, PostgreSQL roles).
//! - [`store`]: the storage trait, the sled store, sealing with AES-256-GCM, the free-disk floor.
//! - [`audit`]: the tamper-evident hash chain of every decision and action, and its anchors.
//! - [`ratelimit`]: token buckets by caller and by remote address, summaries of refused
//!   authentications; bounded whatever keys a client makes up.
//! - [`telemetry`]: logging and metrics.
//! - [`model`]: validated identifiers and the records the others share.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod gateway;
pub mod identity;
pub mod issuers;
pub mod model;
pub mod policy;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod telemetry;

/// Runs the command line and turns an error into a message and exit code 1.
pub async fn main_with(cli: cli::Cli) -> std::process::ExitCode {
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitbroker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
