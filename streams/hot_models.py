"""The worker side of ``ctl load`` / ``unload`` / ``reload``: one callable for the control plane.

:class:`HotModels` is the ``model_command`` hook of
:class:`~autoglm.streams.control.ControlPlane`. It creates a loaded model's
topics (:func:`~autoglm.streams.topics.ensure_topics`), drives the
:class:`~autoglm.models.host.ModelHost` (load and warm-up off the event loop,
swap on reload, release on unload), and tells the worker's data path through
two callables, so that it knows nothing of the consumer it serves:

- ``fetch(model)``: start fetching ``model``'s task topic (subscribe, set up
  its batching policy; the runner is already in ``host.runners``);
- ``drain(model)``: serve what ``model``'s topic held when the unload arrived
  (the worker's bounded fetching), stop fetching it, and wait until each of its
  tasks in flight has its result published and its offset committed.

The returned figures (the model's version: file hash and mtime, device, load
seconds) go into the acknowledgement.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from autoglm.models.host import ModelHost
from autoglm.streams.topics import TopicNames, ensure_topics

log = logging.getLogger(__name__)


class HotModels:
    """``await hot(command, model)`` for ``load``, ``unload`` and ``reload``.

    Args:
        host: the worker's model host (its ``runners`` is the mapping the pipeline serves from).
        bootstrap_servers, names, partitions, replication_factor, max_message_bytes,
            client_kwargs: for creating a newly loaded model's task topic.
        fetch: ``await fetch(model)`` after a load: begin fetching its topic.
        drain: ``await drain(model)`` before an unload: finish and commit its tasks.

    Raises (from ``__call__``):
        ValueError: an unknown command.
        UnknownModelError, ModelSpecError, ModelLoadError: from the host; the
            control plane acknowledges them as ``error`` with the message.
        BrokerError: the topic could not be created.
    """

    def __init__(self, host: ModelHost, *, bootstrap_servers: list[str] | str, names: TopicNames, partitions: int,
                 fetch: Callable[[str], Awaitable[None]], drain: Callable[[str], Awaitable[Any]],
                 replication_factor: int = 1, max_message_bytes: int | None = None,
                 client_kwargs: dict[str, Any] | None = None):
        self.host = host
        self._bootstrap = bootstrap_servers
        self._names = names
        self._partitions = partitions
        self._replication = replication_factor
        self._max_bytes = max_message_bytes
        self._client_kwargs = client_kwargs
        self._fetch = fetch
        self._drain = drain

    async def __call__(self, command: str, model: str) -> dict[str, Any]:
        if command == "load":
            figures = await self.host.load(model)  # load first: an unknown or broken model creates no topic
            await ensure_topics(self._bootstrap, self._names, [model], partitions=self._partitions,
                                replication_factor=self._replication, max_message_bytes=self._max_bytes,
                                client_kwargs=self._client_kwargs)
            await self._fetch(model)
            return figures
        if command == "reload":
            return await self.host.reload(model)
        if command == "unload":
            return await self.host.unload(model, self._drain)
        raise ValueError(f"unknown model command {command!r}; expected load, unload or reload")
