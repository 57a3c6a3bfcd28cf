"""A TCP forwarder that can cut an agent off from etcd (tests), then heal.

``cut()`` resets every connection it carries and closes each new one at
once, as a partition that the kernel reports would; ``heal()`` forwards again.
"""

from __future__ import annotations

import trio


class CutProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.is_cut = False
        self._scopes: set[trio.CancelScope] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.is_cut = True
        for scope in list(self._scopes):
            scope.cancel()

    def heal(self) -> None:
        self.is_cut = False

    async def _handle(self, client: trio.SocketStream) -> None:
        # The scope is cut's to cancel from the first moment: a connection still being
        # made to the target when cut() came used to survive it.
        scope = trio.CancelScope()
        self._scopes.add(scope)
        server: trio.SocketStream | None = None
        try:
            with scope:
                if self.is_cut:
                    return
                try:
                    server = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                self.connections += 1
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:
            self._scopes.discard(scope)
            await trio.aclose_forcefully(client)
            if server is not None:
                await trio.aclose_forcefully(server)

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()
