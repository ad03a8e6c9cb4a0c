"""Context variables that carry the active task and a tool call's credentials.

The framework adapters set :data:`_tool_credentials` around one tool call, from the framework's
own wrap hook, so a tool reads its credential with :func:`credential` while the model sees
neither the secret nor any argument that holds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from .errors import NoCredentialInScope
from .types import Credential, Grant

__all__ = ["credential", "current_task", "tool_credentials"]

_current_task: ContextVar[Any] = ContextVar("jitbroker_current_task", default=None)
_tool_credentials: ContextVar[Mapping[Grant, Credential] | None] = ContextVar(
    "jitbroker_tool_credentials", default=None
)


def current_task() -> Any:
    """The innermost ``broker.task(...)`` (a ``Task`` or ``AsyncTask``) of this context, or None."""
    return _current_task.get()


@contextmanager
def tool_credentials(creds: Mapping[Grant, Credential]) -> Iterator[None]:
    """Makes ``creds`` what :func:`credential` returns inside the block (adapters use this)."""
    token = _tool_credentials.set(dict(creds))
    try:
        yield
    finally:
        _tool_credentials.reset(token)


def credential(resource: str, action: str) -> Credential:
    """The credential the current tool call was given for (resource, action).

    Raises :class:`NoCredentialInScope` outside a tool call that an adapter gave that grant.
    """
    want = Grant(resource, action)
    creds = _tool_credentials.get()
    if creds is not None and want in creds:
        return creds[want]
    task = _current_task.get()
    board = getattr(task, "_delivered", None)
    if board is not None:
        found = board.lookup(want)
        if found is not None:
            return found  # type: ignore[no-any-return]
    have = ", ".join(f"({g.resource}, {g.action})" for g in (creds or {})) or "none"
    raise NoCredentialInScope(
        f"no credential for ({resource}, {action}) in this tool call (it has: {have}); declare "
        "the grant for this tool in the adapter's grants mapping, and call credential() from "
        "inside the tool"
    )
