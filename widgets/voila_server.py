"""What the dashboard's Voila server loads to bound its kernels and keep tracebacks private.

Voila starts one kernel per page load and has no limit (neither has jupyter_server's
kernel manager); the penetration test (issue 15) showed 20 loads taking 1.1 → 2.7 GiB and
about 280 loads exhausting the machine. Both classes here are plugged in through
documented traitlets settings, not by patching Voila:

* :class:`DashboardKernelManager` (``VoilaConfiguration.multi_kernel_manager_class``)
  refuses a kernel beyond ``max_kernels`` with HTTP 503, which Voila renders with the
  Foundry template's ``503.html`` ("busy, try again in a minute"), and culls by what the
  page did: a kernel no page ever connected to (a script, a crawler, a cancelled load)
  after ``unconnected_timeout`` idle seconds, a kernel whose page was closed after
  ``cull_idle_timeout``, and even an open but untouched page after
  ``connected_timeout`` (a tab left open overnight would otherwise hold a slot forever).
* :class:`QuietKernelConnection` (``Voila.kernel_websocket_connection_class``) stands
  between every kernel and every viewer's websocket: an ``error`` message (ipywidgets
  sends the full traceback when a widget message raises), a failed reply and the
  kernel's stderr reach the page as one generic line; the details go to the server log.

Why a kernel per page and not one shared kernel, or none: widget state lives in the
kernel, so a shared kernel would make one viewer's choice of run change every other
viewer's page (and let any viewer's messages reach everyone's); a static export needs
every run's charts rendered into the page up front and regenerated whenever a run
finishes, and it would lose the picker. A per-page kernel with a hard cap keeps the
interactive view and turns "unbounded" into at most ``max_kernels`` kernels (about 80 MiB
each, measured), with a clear message for the visitor who finds them all in use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_core.utils import ensure_async
from jupyter_server._tz import utcnow
from jupyter_server.services.kernels.connection.base import serialize_msg_to_ws_v1
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from jupyter_server.utils import ApiPath
from tornado import web
from traitlets import Integer

from widgets.launchers import (
    CONNECTED_CULL_S,
    DEFAULT_MAX_KERNELS,
    UNCONNECTED_CULL_S,
    minimal_env,
)

__all__ = ["HIDDEN_ERROR", "DashboardKernelManager", "QuietKernelConnection"]

HIDDEN_ERROR = "The dashboard could not do that. The details are in the dashboard server's log."
_V1 = "v1.kernel.websocket.jupyter.org"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DashboardKernelManager(AsyncMappingKernelManager):
    """jupyter_server's kernel manager with a hard cap and a culling policy for pages."""

    max_kernels = Integer(
        DEFAULT_MAX_KERNELS,
        config=True,
        help="Most kernels alive at once (starting ones included); a page load beyond it "
        "gets HTTP 503 'busy'. 0 or less: no limit.",
    )
    unconnected_timeout = Integer(
        UNCONNECTED_CULL_S,
        config=True,
        help="Seconds a kernel no page ever connected to may stay idle (at most "
        "cull_idle_timeout). 0 or less: only cull_idle_timeout applies.",
    )
    connected_timeout = Integer(
        CONNECTED_CULL_S,
        config=True,
        help="Seconds a kernel with an open page may go without any activity. 0 or less: never.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._starting: set[str] = set()
        self._ever_connected: set[str] = set()

    def live_kernels(self) -> int:
        """Kernels that hold a slot: running, starting, or shutting down."""
        return len(set(self._kernels) | self._starting)

    async def start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, path: ApiPath | None = None, **kwargs: Any
    ) -> str:
        """Start a kernel unless the cap is reached; its environment is the allow-list."""
        if kernel_id is not None and kernel_id in self:
            return str(await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs))
        if self.max_kernels > 0 and self.live_kernels() >= self.max_kernels:
            self.log.warning(
                "Dashboard busy: %d of %d kernels in use; page load refused with 503",
                self.live_kernels(),
                self.max_kernels,
            )
            raise web.HTTPError(
                503,
                "All %d dashboard sessions are in use.",
                self.max_kernels,
                reason="Dashboard busy",
            )
        kernel_id = kernel_id or self.new_kernel_id()
        self._starting.add(kernel_id)  # before any await: concurrent loads see the slot
        source: Mapping[str, str] = kwargs.get("env") or os.environ
        kwargs["env"] = minimal_env(source)
        try:
            return str(await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs))
        finally:
            self._starting.discard(kernel_id)

    def notify_connect(self, kernel_id: str) -> None:
        super().notify_connect(kernel_id)
        if kernel_id in self._kernels:
            self._ever_connected.add(kernel_id)

    async def cull_kernels(self) -> None:
        self._ever_connected &= set(self._kernels)
        await super().cull_kernels()

    def _idle_limit(self, kernel_id: str) -> tuple[int, str]:
        """How long this kernel may stay idle, by what its page did, and why."""
        if self._kernel_connections.get(kernel_id, 0):
            return self.connected_timeout, "its page is open but unused"
        if kernel_id in self._ever_connected:
            return self.cull_idle_timeout, "its page was closed"
        limits = [t for t in (self.unconnected_timeout, self.cull_idle_timeout) if t > 0]
        return min(limits, default=0), "no page ever connected to it"

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        kernel = self._kernels[kernel_id]
        state = getattr(kernel, "execution_state", None)
        if state == "dead" or not hasattr(kernel, "last_activity"):
            await super().cull_kernel_if_idle(kernel_id)
            return
        if state == "starting" or (state == "busy" and not self.cull_busy):
            return  # still rendering the page
        limit, why = self._idle_limit(kernel_id)
        idle_s = (utcnow() - kernel.last_activity).total_seconds()
        if limit > 0 and idle_s > limit:
            self.log.warning(
                "Culling dashboard kernel %s: %s, idle %.0f s (limit %d s)",
                kernel_id,
                why,
                idle_s,
                limit,
            )
            await ensure_async(self.shutdown_kernel(kernel_id))


class QuietKernelConnection(ZMQChannelsWebsocketConnection):
    """The kernel websocket, with errors and stderr kept in the server log.

    Only these message types are opened and checked (widget state updates, often large,
    pass untouched): ``error``, ``stream``, and every ``*_reply``.
    """

    def handle_outgoing_message(self, stream: Any, outgoing_msg: list[Any]) -> None:
        _, parts = self.session.feed_identities(outgoing_msg)
        msg = self._peek(parts)
        if msg is not None:
            quiet = self._quieted(msg)
            if quiet is not msg:
                if quiet is not None:
                    self._send(stream, quiet)
                return
        super().handle_outgoing_message(stream, outgoing_msg)

    def _peek(self, parts: list[Any]) -> dict[str, Any] | None:
        """The message, unpacked, if its type can carry a traceback; else None.

        Unpacked without ``session.deserialize``: that records the signature, and the
        normal path (which checks it) would then refuse the message as a replay.
        """
        try:
            header = self.session.unpack(parts[1])
            msg_type = str(header.get("msg_type", ""))
            if msg_type not in {"error", "stream"} and not msg_type.endswith("_reply"):
                return None
            return {
                "header": header,
                "parent_header": self.session.unpack(parts[2]),
                "metadata": self.session.unpack(parts[3]),
                "content": self.session.unpack(parts[4]),
                "buffers": [],
            }
        except (IndexError, ValueError, TypeError, AttributeError):
            return None  # the normal path reports malformed messages

    def _quieted(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """``msg`` itself if harmless, a scrubbed copy, or None to drop it."""
        msg_type = msg["header"].get("msg_type")
        content = msg.get("content") or {}
        if msg_type == "stream":
            if content.get("name") != "stderr":
                return msg
            self._log_hidden(msg_type, str(content.get("text", "")))
            return None
        if msg_type != "error" and content.get("status") != "error":
            return msg
        detail = "\n".join(str(line) for line in content.get("traceback") or ())
        self._log_hidden(msg_type, detail or f"{content.get('ename')}: {content.get('evalue')}")
        scrubbed = {**content, "ename": "Error", "evalue": HIDDEN_ERROR, "traceback": []}
        return {**msg, "content": scrubbed, "buffers": []}

    def _log_hidden(self, msg_type: object, text: str) -> None:
        self.log.warning(
            "Kernel %s: %s hidden from the viewer:\n%s",
            self.kernel_id,
            msg_type,
            _ANSI.sub("", text).rstrip(),
        )

    def _send(self, stream: Any, msg: dict[str, Any]) -> None:
        if isinstance(stream, str):
            stream = self.channels[stream]
        channel = getattr(stream, "channel", None) or "iopub"
        if self.subprotocol == _V1:
            self.write_message(serialize_msg_to_ws_v1(msg, channel, self.session.pack), binary=True)
        else:
            self.write_message(json.dumps({**msg, "channel": channel}, default=json_default))
