//! Durable state behind a small trait (DESIGN §7), so the broker never sees the storage engine and
//! another engine can be added beside [`sled_store::SledStore`].

pub mod crypto;
pub mod disk;
pub mod sled_store;

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;
use crate::model::{
    Approval, ApprovalId, CredentialId, CredentialRecord, Grant, Revocation, Secret, SpiffeId,
    Task, TaskId, UnixMillis, UpstreamObject,
};

pub use sled_store::SledStore;

/// What an entry of the expiry index points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expiring {
    Task(TaskId),
    Credential(CredentialId),
    /// An ended task whose retention window is over: delete it and its credentials.
    Purge(TaskId),
}

/// Audit entries in order: (stored sequence number, entry bytes).
pub type AuditIter<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>)>> + 'a>;

/// A future that resolves once everything written before it was asked for is on disk.
pub type Durable<'a> = Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// Storage operations the broker needs. Each method is atomic: it either applies whole or not at
/// all. Writes become durable when [`Store::durable`] resolves (group commit).
pub trait Store: Send + Sync + 'static {
    /// Inserts a new task, its identity index entry, its expiry entry, its idempotency key and,
    /// for a delegated task, its parent's children index entry.
    fn create_task(&self, task: &Task) -> Result<()>;
    /// Replaces a task record (state changes). An ended task leaves the identity index, which
    /// lists live tasks only; if it carries `purge_at`, a `Purge` expiry entry is added with it.
    fn update_task(&self, task: &Task) -> Result<()>;
    /// Deletes an ended task with everything kept for it: its credentials (records, index and
    /// idempotency entries), its expiry entries, its approvals and its children index. Idempotent:
    /// an interrupted purge is finished by the next call. Returns whether the task was there.
    fn purge_task(&self, id: &TaskId) -> Result<bool>;
    fn get_task(&self, id: &TaskId) -> Result<Option<Task>>;
    /// The task an owner created with this idempotency key, if any.
    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Result<Option<TaskId>>;
    /// Tasks of an owner that have not ended (some may be past expiry but not yet reaped).
    fn tasks_of_identity(&self, owner: &SpiffeId) -> Result<Vec<TaskId>>;

    /// Inserts a credential with its sealed secret, the secret index entry, the task index entry,
    /// the expiry entry and its idempotency key.
    fn create_credential(&self, rec: &CredentialRecord, secret: &Secret) -> Result<()>;
    /// Replaces a credential record. When it is no longer active, the sealed secret and the
    /// secret index entry are deleted: a dead credential's secret is not kept.
    fn update_credential(&self, rec: &CredentialRecord) -> Result<()>;
    fn get_credential(&self, id: &CredentialId) -> Result<Option<CredentialRecord>>;
    /// Unseals a live credential's secret (for idempotent replay of an issuance).
    fn credential_secret(&self, id: &CredentialId) -> Result<Option<Secret>>;
    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Result<Option<CredentialId>>;
    fn credential_by_secret(&self, secret: &str) -> Result<Option<CredentialId>>;
    fn credentials_of_task(&self, task: &TaskId) -> Result<Vec<CredentialId>>;

    /// Up to `limit` expiry entries due at or before `now`, earliest first.
    fn due(&self, now: UnixMillis, limit: usize) -> Result<Vec<(UnixMillis, Expiring)>>;
    /// The earliest expiry entry, for the reaper to sleep until.
    fn next_due(&self) -> Result<Option<UnixMillis>>;
    fn remove_due(&self, at: UnixMillis, what: &Expiring) -> Result<()>;

    /// Reads a value of the `meta` tree, unsealing it if it was stored sealed.
    fn meta_get_sealed(&self, key: &str) -> Result<Option<Secret>>;
    fn meta_put_sealed(&self, key: &str, value: &Secret) -> Result<()>;
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Delegated child tasks of a task.
    fn children_of(&self, task: &TaskId) -> Result<Vec<TaskId>>;

    fn put_approval(&self, a: &Approval) -> Result<()>;
    fn get_approval(&self, id: &ApprovalId) -> Result<Option<Approval>>;
    /// The current approval request of a (task, resource, action).
    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Result<Option<ApprovalId>>;
    fn list_approvals(&self) -> Result<Vec<Approval>>;

    /// Up to `limit` tasks with ids after `after`, in id order (admin listing).
    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Result<Vec<Task>>;
    /// Marks an identity blocked or not; returns whether it was blocked before.
    fn set_blocked(&self, id: &SpiffeId, blocked: bool) -> Result<bool>;
    fn blocked_identities(&self) -> Result<Vec<SpiffeId>>;

    /// The last audit entry, if any.
    fn audit_last(&self) -> Result<Option<Vec<u8>>>;
    /// Stores audit entry `seq` (the audit log orders and chains them).
    fn audit_put(&self, seq: u64, entry: &[u8]) -> Result<()>;
    /// The audit entries from sequence number `from` on, in order, with the sequence number
    /// each is stored under.
    fn audit_scan(&self, from: u64) -> Result<AuditIter<'_>>;
    /// Deletes the audit entries up to and including `seq` (archived ones). Returns how many.
    fn audit_remove_through(&self, seq: u64) -> Result<u64>;

    /// Records an upstream account in the ledger (write-ahead `Creating`, then `Live`).
    fn put_upstream(&self, o: &UpstreamObject) -> Result<()>;
    /// Every upstream account in the ledger.
    fn upstream_objects(&self) -> Result<Vec<UpstreamObject>>;
    /// Removes the account from the ledger and queues its revocation, in one step.
    fn queue_revocation(&self, r: &Revocation) -> Result<()>;
    /// Replaces a queued revocation (attempt count, next attempt, last error).
    fn update_revocation(&self, r: &Revocation) -> Result<()>;
    /// Removes a revocation that succeeded.
    fn remove_revocation(&self, resource: &str, name: &str) -> Result<()>;
    /// The revocation queue, in key order.
    fn revocations(&self) -> Result<Vec<Revocation>>;

    /// Counts of records not yet ended, for status and metrics.
    fn counts(&self) -> Result<Counts>;

    /// Resolves when every write made before the call is flushed to disk.
    fn durable(&self) -> Durable<'_>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub tasks: u64,
    pub credentials: u64,
}
