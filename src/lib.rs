//! jitbroker: a SPIFFE-native just-in-time secrets broker for AI agents.
//!
//! An agent proves what it is with a SPIFFE SVID, declares a task, and receives credentials scoped
//! to that task that live for minutes and die when the task ends.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`serve`, `dev`, `dev-svid`, `check-config`, `policy`, `audit`).
//! - [`config`]: the TOML configuration, environment overrides, validation.
//! - [`error`]: the domain's error type.
//! - [`server`]: assembles everything once (engine, sealing, broker, identity, listeners, the
//!   background loops) and serves the API (mTLS gRPC), ops (HTTP) and HTTPS (forward auth,
//!   OAuth) ports; `server/limits.rs` holds the API port's limits (connections, idle
//!   connections, requests at once, request time and size, rate per remote address).
//! - [`api`]: the edge. The gRPC services, the only code that touches tonic and prost types;
//!   `api::status` is the one mapping from errors to gRPC status; `api::ext_authz` speaks
//!   Envoy's protocol, `api::forward_auth` HTTP forward auth (nginx, Caddy, Traefik),
//!   `api::oauth` the OAuth surface (discovery, JWKS, token, introspection, revocation).
//! - [`identity`]: where SVIDs come from (SPIRE, files, dev CA) and how TLS uses them.
//! - [`policy`]: Cedar policies, evaluated at request time (a pure function of the request).
//! - [`broker`]: the domain: no tonic, no sled. Components with one job each around a shared
//!   `broker::Core` (store, policy, issuers, clock, limits, metrics, the checks every call
//!   makes), wired once by `Broker::assemble` (called by `server`): `Tasks` (`broker/tasks.rs`,
//!   delegation in `broker/delegation.rs`), `Credentials` (`broker/credentials.rs`),
//!   `Approvals`, `Revocations` (upstream accounts, `broker/upstream.rs`), `Reaper`, `Admin`,
//!   `Retention` (audit anchors and archival), `ToolCalls` (gateways), `OAuth`. Every handler
//!   opens one unit of work of the store, does its reads, writes and audit in it, and answers
//!   after its commit (`Core::finish`).
//! - [`gateway`]: the `[gateway]` configuration and the routing of HTTP and MCP calls to grants.
//! - [`issuers`]: the credential kinds: opaque tokens (`issuers::token`), ES256 JWTs and their
//!   rotating keys (`issuers::jwt`), X.509 certificates from per-resource CAs (`issuers::x509`),
//!   PostgreSQL roles (`issuers::postgres`).
//! - [`store`]: the engine interface (async, unit of work, locks, claims, compare-and-swap,
//!   leases; its guarantees are in the module's documentation), `Storage` (sealing above the
//!   engine, [`store::crypto`]), in-process engines ([`store::local`]: sled, the embedded
//!   default, and an in-memory engine), the PostgreSQL engine several replicas share
//!   ([`store::postgres`], docs/ha.md), the free-disk floor.
//! - [`audit`]: the tamper-evident hash chain, its verification, export, archival and anchors.
//! - [`ratelimit`]: token buckets by caller and by remote address, summaries of refused
//!   authentications; bounded whatever keys a client makes up.
//! - [`telemetry`]: logging and metrics.
//! - [`model`]: validated identifiers and the records the others share.
//!
//! # Where things happen
//!
//! - A task is created in one place, `Tasks::create_task` (`broker/tasks.rs`): `StartTask`,
//!   `DelegateTask` (`broker/delegation.rs`) and the OAuth grants (`broker/oauth.rs`) call it;
//!   it takes the owner's lock, refuses a blocked owner, holds the quota and the idempotency key.
//! - A credential is issued in one place, `Credentials::issue_for_task` → `mint_credential`
//!   (`broker/credentials.rs`): `IssueCredential`, the OAuth token endpoint and (through
//!   `mint_credential`) gateway tool calls (`broker/tool_calls.rs`).
//! - Policy decisions: `Core::evaluate` (`broker/tool_calls.rs`) is pure; callers record the
//!   decision in the unit of work of the action it decided (`Core::record_decision`). An
//!   allowed issuance hands its decision to `mint_credential` (`Minting::allowed`), whose
//!   `credential_issued` entry carries it. `PolicyEngine` (`policy/mod.rs`) prepares the
//!   applicable policies and entities once per (principal, action, resource).
//! - Live counts (the `Status`/metrics gauges) on sled: kept in memory, saved with each group
//!   commit (`flusher` in `store/sled_store.rs`), so a start after a crash does not count.
//! - Durability: `Uow::commit` (`store/local.rs` for in-process engines, `store/postgres.rs`
//!   for PostgreSQL: the transaction's commit); the sled group commit is
//!   `store/sled_store.rs` (`flusher`). The engine is chosen by `[store] engine` in
//!   `server::open_engine`.
//! - Audit entries are appended by the commit of the unit that recorded them, as its last step
//!   (`store/local.rs`, chain head `audit::Head`; on PostgreSQL the head is a row locked by the
//!   committing transaction).
//! - Several replicas: everything they share is in the engine (row locks, claims, leases); what
//!   assumes one process is asked of `Store::shared` (start-up recovery in
//!   `broker/upstream.rs`); readiness checks the engine and clock skew (`Core::ready`); a new
//!   JWT key signs only after every replica can publish it (`issuers/jwt.rs`).
//! - Credentials end in `Credentials::end_credential`; tasks in `Tasks::end_task`
//!   (`broker/tasks.rs`); descendants in `Tasks::revoke_descendants` (`broker/delegation.rs`).
//! - Expiry: the reaper (`broker/reaper.rs`) claims due entries and ends them a batch per unit.
//! - Upstream accounts (PostgreSQL roles): write-ahead creation, the revocation queue (claimed,
//!   retried with backoff until done) and the reconciler are in `broker/upstream.rs`.
//! - Approvals: `broker/approvals.rs` (used once through `Uow::consume_approval`).
//! - The kill switch: `Admin::revoke_identity` (`broker/admin.rs`), checked under the identity's
//!   lock by `create_task` and by `Core::check_caller` on every call.
//! - Key material (data keys, JWT keys, CAs): created once through `Store::meta_put_if_absent`
//!   (`store/crypto.rs`, `issuers/x509.rs`), JWT rotation by compare-and-swap (`issuers/jwt.rs`).
//! - Retention, audit archival and anchors: `broker/retention.rs`, `audit/archive.rs`.

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
