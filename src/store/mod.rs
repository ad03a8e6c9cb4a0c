//! Durable state (DESIGN §7). Three layers, from the broker down:
//!
//! - [`Storage`]: what the broker holds. An engine plus sealing: secrets, key material and other
//!   sealed values are sealed here (KEK → data keys → AES-256-GCM bound to where the value is
//!   stored, [`crypto`]), so an engine, its backups and its operators only ever see ciphertext
//!   and keyed hashes.
//! - [`Store`]: the engine interface. Asynchronous, with a **unit of work** per request
//!   ([`Uow`]): its explicit primitives (identity and task locks, insert-if-absent, compare and
//!   swap, claims, leases, audit appended as the last step) are ones a transactional, replicated
//!   engine implements with the same meaning; [`Uow::commit`] is the durability point.
//! - In-process engines implement the smaller, synchronous [`local::LocalEngine`]; [`local`]
//!   turns any of them into a [`Store`] (locks, claims, leases, the audit head and the kill-switch
//!   set held in this process). Two exist: [`SledStore`] (the embedded default) and
//!   [`memory::MemoryStore`] (nothing on disk, for tests and the conformance suite).
//!
//! # What the interface guarantees
//!
//! - **Commit is durability.** Whatever a unit of work wrote, and the audit entries it recorded,
//!   are durable when [`Uow::commit`] resolves `Ok`. Nobody calls a flush by hand: a handler
//!   replies after its commit.
//! - **Audit is appended by the commit, as the last step**, in the order recorded, to a chain
//!   with no gap and no fork however units interleave. A unit dropped without commit appends
//!   nothing.
//! - **Writes of a dropped unit.** The in-process engines write through (each write is applied
//!   when made, each one atomic), so a unit dropped half-way may leave a prefix of its writes:
//!   the broker orders writes so that every prefix is harmless (index entries before the record
//!   they point at; readers treat an index entry without a live record as absent). A
//!   transactional engine rolls back instead; both meet the contract "a dropped unit records
//!   nothing in the audit trail and acknowledges nothing".
//! - **Locks** ([`Uow::lock_identity`], [`Uow::lock_task`]) are held until the unit commits or
//!   is dropped, across every replica the engine serves. Taken in this order only: at most one
//!   identity, then tasks, ancestors before descendants. [`Uow::try_lock_task`] never waits (the
//!   reaper's claims), so it can be taken in any order.
//! - **The kill switch is seen at once**: [`Uow::lock_identity`] returns the blocked flag as
//!   committed by any replica, and [`Store::is_blocked`] reads the same.
//! - **Insert-if-absent and compare-and-swap**: an idempotency key maps to one task or one
//!   credential ([`Uow::insert_task`], [`Uow::insert_credential`]); an approval is used once
//!   ([`Uow::consume_approval`]); key material is created once ([`Store::meta_put_if_absent`])
//!   and replaced only from the version read ([`Store::meta_cas`]).
//! - **Claims** ([`Uow::claim_due`], [`Uow::claim_revocations`]): a due entry or a queued
//!   revocation is handed to one unit of work at a time; a claim ends with its unit (due
//!   entries) or after its hold time (revocations, whose work happens outside any unit).
//! - **Leases** ([`Store::try_lease`]) give singleton work one holder at a time, with an epoch
//!   that grows at each change of holder; [`Uow::fence`] refuses a unit whose holder lost it.

pub mod crypto;
pub mod disk;
pub mod local;
pub mod memory;
pub mod postgres;
pub mod sled_store;
#[cfg(test)]
mod test_records;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::audit::{Anchor, Event};
use crate::error::{Error, Result};
use crate::model::{
    Approval, ApprovalId, CredentialId, CredentialRecord, Grant, Revocation, Secret, SpiffeId,
    Task, TaskId, UnixMillis, UpstreamObject,
};

pub use crypto::{Kek, Sealer};
pub use memory::MemoryStore;
pub use postgres::{PgSettings, PgStore};
pub use sled_store::SledStore;

/// A boxed future: the engine interface is object safe.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What an entry of the expiry index points at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expiring {
    Task(TaskId),
    Credential(CredentialId),
    /// An ended task whose retention window is over: delete it and its credentials.
    Purge(TaskId),
}

/// A credential's secret as an engine keeps it: sealed, and its keyed hash (the lookup key of
/// `Introspect`). Made by [`Storage::seal_secret`].
#[derive(Clone, Debug)]
pub struct SealedSecret {
    pub sealed: Vec<u8>,
    pub index: [u8; 32],
}

/// The outcome of an insert-if-absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted<T> {
    /// Written.
    New,
    /// The idempotency key already names this one; nothing was written.
    Existing(T),
}

/// An identity's row, read under its lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityRow {
    /// Blocked by an operator (the kill switch).
    pub blocked: bool,
}

/// A lease on singleton work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Grows each time the lease changes holder; a unit fenced with an older epoch is refused.
    pub epoch: u64,
    pub valid_until: UnixMillis,
}

/// A change other replicas may cache (sent by the engine once committed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Blocked(SpiffeId, bool),
    Meta(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub tasks: u64,
    pub credentials: u64,
}

/// The engine interface (see the module documentation for what it guarantees).
pub trait Store: Send + Sync + 'static {
    /// Starts a unit of work.
    fn begin(&self) -> Fut<'_, Box<dyn Uow<'_> + '_>>;

    // Reads outside a unit of work: each sees committed state.
    fn get_task(&self, id: &TaskId) -> Fut<'_, Option<Task>>;
    /// The task an owner created with this idempotency key, if any.
    fn task_by_idempotency_key(&self, owner: &SpiffeId, key: &str) -> Fut<'_, Option<TaskId>>;
    /// Tasks of an owner that have not ended (some may be past expiry but not yet reaped).
    fn tasks_of_identity(&self, owner: &SpiffeId) -> Fut<'_, Vec<TaskId>>;
    /// Delegated child tasks of a task.
    fn children_of(&self, task: &TaskId) -> Fut<'_, Vec<TaskId>>;
    /// Up to `limit` tasks with ids after `after`, in id order (admin listing).
    fn scan_tasks(&self, after: Option<&TaskId>, limit: usize) -> Fut<'_, Vec<Task>>;

    fn get_credential(&self, id: &CredentialId) -> Fut<'_, Option<CredentialRecord>>;
    /// The sealed secret of a live credential (none once it ended).
    fn credential_sealed(&self, id: &CredentialId) -> Fut<'_, Option<Vec<u8>>>;
    /// The credential whose secret has this keyed hash, while it is active.
    fn credential_by_index(&self, index: &[u8; 32]) -> Fut<'_, Option<CredentialId>>;
    fn credential_by_idempotency_key(
        &self,
        task: &TaskId,
        key: &str,
    ) -> Fut<'_, Option<CredentialId>>;
    fn credentials_of_task(&self, task: &TaskId) -> Fut<'_, Vec<CredentialId>>;

    fn get_approval(&self, id: &ApprovalId) -> Fut<'_, Option<Approval>>;
    /// The current approval request of a (task, resource, action).
    fn approval_for_grant(&self, task: &TaskId, grant: &Grant) -> Fut<'_, Option<ApprovalId>>;
    fn list_approvals(&self) -> Fut<'_, Vec<Approval>>;

    /// Whether an operator blocked this identity (committed by any replica).
    fn is_blocked(&self, id: &SpiffeId) -> Fut<'_, bool>;
    fn blocked_identities(&self) -> Fut<'_, Vec<SpiffeId>>;

    /// Every upstream account in the ledger.
    fn upstream_objects(&self) -> Fut<'_, Vec<UpstreamObject>>;
    /// The revocation queue, in key order.
    fn revocations(&self) -> Fut<'_, Vec<Revocation>>;

    /// The earliest expiry entry, for the reaper to sleep until.
    fn next_due(&self) -> Fut<'_, Option<UnixMillis>>;

    /// The last committed audit entry's sequence number and hash.
    fn audit_head(&self) -> Fut<'_, Anchor>;
    /// Up to `limit` audit entries from sequence number `from` on, in order.
    fn audit_scan(&self, from: u64, limit: usize) -> Fut<'_, Vec<(u64, Vec<u8>)>>;
    /// Deletes the audit entries up to and including `seq` (archived ones). Returns how many.
    fn audit_remove_through(&self, seq: u64) -> Fut<'_, u64>;

    /// Counts of records not yet ended, for status and metrics.
    fn counts(&self) -> Fut<'_, Counts>;

    /// A raw `meta` value (sealed values are sealed by [`Storage`]).
    fn meta_get(&self, key: &str) -> Fut<'_, Option<Vec<u8>>>;
    /// Stores `value` under `key` unless something is there; returns what is there after the
    /// call (the winner, when several replicas race to create key material). Durable on return.
    fn meta_put_if_absent(&self, key: &str, value: Vec<u8>) -> Fut<'_, Vec<u8>>;
    /// Replaces the value of `key` only if it is still `expected` (`None`: absent). Durable on
    /// return when it returns `true`.
    fn meta_cas(&self, key: &str, expected: Option<Vec<u8>>, value: Vec<u8>) -> Fut<'_, bool>;

    /// Takes or renews the lease `name` for `holder` until `now + ttl_ms`, if nobody else holds
    /// it at `now`. `None`: someone else does.
    fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: UnixMillis,
        ttl_ms: i64,
    ) -> Fut<'_, Option<Lease>>;
    /// Committed changes worth a cache's attention.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Change>;

    /// Whether other processes may share this engine (other replicas): work that an
    /// in-process engine may assume is its own (e.g. start-up recovery) must then not be.
    fn shared(&self) -> bool {
        false
    }

    /// Fails `UNAVAILABLE` when the engine cannot serve now (readiness): unreachable, or its
    /// clock and `now` more than `max_skew_ms` apart (replicas judge expiry by their own clocks).
    fn check_ready(&self, _now: UnixMillis, _max_skew_ms: i64) -> Fut<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One unit of work (see the module documentation). Writes are queued or applied as the engine
/// does; audit entries are appended by [`Uow::commit`].
pub trait Uow<'s>: Send + 's {
    /// Locks an identity (its task creation and its kill switch) until the unit ends.
    fn lock_identity<'a>(&'a mut self, id: &'a SpiffeId) -> Fut<'a, IdentityRow>;
    /// Locks a task until the unit ends, and reads it under the lock.
    fn lock_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, Option<Task>>;
    /// Locks a task if nobody holds it (`None`), without waiting; reads it under the lock.
    fn try_lock_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, Option<Option<Task>>>;

    /// Creates a task (with its indexes), unless its owner's idempotency key already names one.
    /// The caller holds the owner's lock.
    fn insert_task<'a>(&'a mut self, task: &'a Task) -> Fut<'a, Inserted<TaskId>>;
    /// Replaces a task record (state changes). An ended task leaves its owner's live index.
    fn update_task<'a>(&'a mut self, task: &'a Task) -> Fut<'a, ()>;
    /// Deletes an ended task with everything kept for it (resumable). Whether it was there.
    fn purge_task<'a>(&'a mut self, id: &'a TaskId) -> Fut<'a, bool>;

    /// Creates a credential with its sealed secret, unless the task's idempotency key already
    /// names one. The caller holds the task's lock.
    fn insert_credential<'a>(
        &'a mut self,
        rec: &'a CredentialRecord,
        secret: &'a SealedSecret,
    ) -> Fut<'a, Inserted<CredentialId>>;
    /// Replaces a credential record; once it is no longer active its sealed secret and index
    /// entry are deleted.
    fn update_credential<'a>(&'a mut self, rec: &'a CredentialRecord) -> Fut<'a, ()>;

    fn put_approval<'a>(&'a mut self, a: &'a Approval) -> Fut<'a, ()>;
    /// Marks a granted approval used by `by`, if it is still granted and unused: `true` for the
    /// one unit that wins.
    fn consume_approval<'a>(
        &'a mut self,
        id: &'a ApprovalId,
        by: &'a str,
        now: UnixMillis,
    ) -> Fut<'a, bool>;

    /// Sets the kill switch of an identity (the caller holds its lock); whether it was set.
    fn set_blocked<'a>(&'a mut self, id: &'a SpiffeId, blocked: bool) -> Fut<'a, bool>;

    fn put_upstream<'a>(&'a mut self, o: &'a UpstreamObject) -> Fut<'a, ()>;
    /// Removes the account from the ledger and queues its revocation, in one step.
    fn queue_revocation<'a>(&'a mut self, r: &'a Revocation) -> Fut<'a, ()>;
    /// Replaces a queued revocation (attempts, next attempt, last error) and ends its claim; a
    /// revocation no longer queued (another worker finished it) stays gone.
    fn update_revocation<'a>(&'a mut self, r: &'a Revocation) -> Fut<'a, ()>;
    /// Removes a revocation that succeeded. `false` if it was no longer queued.
    fn remove_revocation<'a>(&'a mut self, resource: &'a str, name: &'a str) -> Fut<'a, bool>;
    /// Up to `limit` queued revocations due at `now` that nobody has claimed, claimed for
    /// `hold_ms` (the work happens outside any unit of work).
    fn claim_revocations(
        &mut self,
        now: UnixMillis,
        limit: usize,
        hold_ms: i64,
    ) -> Fut<'_, Vec<Revocation>>;

    /// Up to `limit` expiry entries due at or before `now` that no other unit holds, earliest
    /// first, held by this unit until it ends.
    fn claim_due(&mut self, now: UnixMillis, limit: usize) -> Fut<'_, Vec<(UnixMillis, Expiring)>>;
    fn remove_due<'a>(&'a mut self, at: UnixMillis, what: &'a Expiring) -> Fut<'a, ()>;

    /// Writes a raw `meta` value (sealed values are sealed by [`Storage`]).
    fn meta_put<'a>(&'a mut self, key: &'a str, value: Vec<u8>) -> Fut<'a, ()>;

    /// Refuses the unit (at once, and again at commit) unless `lease` is still held with `epoch`.
    fn fence<'a>(&'a mut self, lease: &'a str, epoch: u64) -> Fut<'a, ()>;

    /// Records an audit event, appended at commit.
    fn audit(&mut self, time: UnixMillis, event: Event);

    /// Appends the recorded audit events, ends the unit's locks and claims, and resolves once
    /// everything the unit wrote is durable. Returns the sequence numbers of its audit entries.
    fn commit(self: Box<Self>) -> Fut<'s, Vec<u64>>;
}

/// What the broker holds: an engine and the sealing above it.
pub struct Storage {
    engine: Arc<dyn Store>,
    sealer: Sealer,
}

/// AAD location of credential secrets and of sealed meta values (unchanged since the first
/// release: values sealed then still open).
const CREDENTIALS: &str = "credentials";
const META: &str = "meta";

impl Storage {
    /// Loads the data keys (creating them once, whichever replica gets there first) and checks
    /// `kek` against them.
    pub async fn open(engine: Arc<dyn Store>, kek: &Kek) -> Result<Self> {
        let sealer = crypto::load_or_create_keys(engine.as_ref(), kek).await?;
        Ok(Self { engine, sealer })
    }

    pub fn engine(&self) -> &dyn Store {
        self.engine.as_ref()
    }

    pub fn engine_arc(&self) -> &Arc<dyn Store> {
        &self.engine
    }

    pub async fn begin(&self) -> Result<Box<dyn Uow<'_> + '_>> {
        self.engine.begin().await
    }

    /// Seals a new credential's secret where it will be stored.
    pub fn seal_secret(&self, id: &CredentialId, secret: &Secret) -> Result<SealedSecret> {
        Ok(SealedSecret {
            sealed: self.sealer.seal(
                CREDENTIALS,
                id.as_str().as_bytes(),
                secret.expose().as_bytes(),
            )?,
            index: self.sealer.index_hash(secret.expose().as_bytes()),
        })
    }

    /// Unseals a live credential's secret (for idempotent replay of an issuance).
    pub async fn credential_secret(&self, id: &CredentialId) -> Result<Option<Secret>> {
        let Some(sealed) = self.engine.credential_sealed(id).await? else {
            return Ok(None);
        };
        let plain = self
            .sealer
            .open(CREDENTIALS, id.as_str().as_bytes(), &sealed)?;
        let s = std::str::from_utf8(&plain)
            .map_err(|_| Error::Storage("sealed secret is not UTF-8".into()))?;
        Ok(Some(Secret::new(s.to_owned())))
    }

    /// The active credential holding this secret, by its keyed hash.
    pub async fn credential_by_secret(&self, secret: &str) -> Result<Option<CredentialId>> {
        let index = self.sealer.index_hash(secret.as_bytes());
        self.engine.credential_by_index(&index).await
    }

    /// Seals `value` for `meta` key `key`.
    pub fn seal_meta(&self, key: &str, value: &Secret) -> Result<Vec<u8>> {
        let full = sealed_meta_key(key);
        self.sealer
            .seal(META, full.as_bytes(), value.expose().as_bytes())
    }

    /// Opens what [`Storage::seal_meta`] sealed for `key`.
    pub fn open_meta(&self, key: &str, sealed: &[u8]) -> Result<Secret> {
        let full = sealed_meta_key(key);
        let plain = self.sealer.open(META, full.as_bytes(), sealed)?;
        let s = std::str::from_utf8(&plain)
            .map_err(|_| Error::Storage(format!("sealed meta {key} is not UTF-8")))?;
        Ok(Secret::new(s.to_owned()))
    }

    /// Reads and opens a sealed `meta` value.
    pub async fn meta_get_sealed(&self, key: &str) -> Result<Option<Secret>> {
        match self.engine.meta_get(&sealed_meta_key(key)).await? {
            Some(v) => Ok(Some(self.open_meta(key, &v)?)),
            None => Ok(None),
        }
    }

    /// Creates a sealed `meta` value once: returns the value every replica will read (ours, or
    /// the one another replica stored first).
    pub async fn meta_create_sealed(&self, key: &str, value: &Secret) -> Result<Secret> {
        let winner = self
            .engine
            .meta_put_if_absent(&sealed_meta_key(key), self.seal_meta(key, value)?)
            .await?;
        self.open_meta(key, &winner)
    }

    /// Replaces a sealed `meta` value if it still holds `expected` (compared as stored).
    pub async fn meta_replace_sealed(
        &self,
        key: &str,
        expected: Option<&Secret>,
        value: &Secret,
    ) -> Result<bool> {
        let full = sealed_meta_key(key);
        let current = self.engine.meta_get(&full).await?;
        let same = match (&current, expected) {
            (None, None) => true,
            (Some(c), Some(e)) => self.open_meta(key, c)?.expose() == e.expose(),
            _ => false,
        };
        if !same {
            return Ok(false);
        }
        self.engine
            .meta_cas(&full, current, self.seal_meta(key, value)?)
            .await
    }

    /// A plain (not secret) `meta` value.
    pub async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.engine.meta_get(&plain_meta_key(key)).await
    }
}

pub(crate) fn sealed_meta_key(key: &str) -> String {
    format!("sealed/{key}")
}

pub(crate) fn plain_meta_key(key: &str) -> String {
    format!("plain/{key}")
}

impl std::ops::Deref for Storage {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        self.engine.as_ref()
    }
}
