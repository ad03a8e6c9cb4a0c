"""jitbroker: just-in-time, task-scoped credentials for AI agents, from a SPIFFE identity.

>>> broker = Broker.from_env()
>>> with broker.task("summarise ticket 42", grants=[("tickets", "read")], ttl=600) as task:
...     cred = task.credential("tickets", "read")

Layout: :mod:`jitbroker.identity` (where the SVID comes from), ``_channels`` (channels that
follow SVID rotation, deadlines, retries), ``_sync`` / ``_async`` (the two clients of one shape),
:mod:`jitbroker.errors` (status codes to typed errors), :mod:`jitbroker.types` (results; secrets
redacted), :mod:`jitbroker.context` (the context variables the framework adapters set),
:mod:`jitbroker.adapters` (Pydantic AI, LangChain, OpenAI Agents SDK, httpx), ``v1`` (generated).
"""

from ._async import AsyncAdmin, AsyncBroker, AsyncTask, AsyncVerifier
from ._channels import RetryPolicy
from ._common import InvalidToken
from ._sync import Admin, Broker, Task, Verifier
from .context import credential, current_task
from .errors import (
    ApprovalDenied,
    ApprovalPending,
    BrokerUnavailable,
    FailedPrecondition,
    IdentityError,
    InvalidArgument,
    JitbrokerError,
    NoCredentialInScope,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    TaskNotActive,
    Unauthenticated,
)
from .identity import (
    BundleOnlySource,
    FilesSource,
    IdentitySource,
    WorkloadApiSource,
    jwt_svid_from_file,
)
from .types import Approval, Credential, Grant, GrantDecision, Introspection, Secret, TaskInfo

__version__ = "0.1.0"

__all__ = [
    "Admin",
    "Approval",
    "ApprovalDenied",
    "ApprovalPending",
    "AsyncAdmin",
    "AsyncBroker",
    "AsyncTask",
    "AsyncVerifier",
    "Broker",
    "BrokerUnavailable",
    "BundleOnlySource",
    "Credential",
    "FailedPrecondition",
    "FilesSource",
    "Grant",
    "GrantDecision",
    "IdentityError",
    "IdentitySource",
    "Introspection",
    "InvalidArgument",
    "InvalidToken",
    "JitbrokerError",
    "NoCredentialInScope",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "RetryPolicy",
    "Secret",
    "Task",
    "TaskInfo",
    "TaskNotActive",
    "Unauthenticated",
    "Verifier",
    "WorkloadApiSource",
    "credential",
    "current_task",
    "jwt_svid_from_file",
]
