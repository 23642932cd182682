"""The WebSocket transport of the Island link: the route Islands connect to
(`protocol.island.CHANNEL_PATH`); each connection is served by the channel."""

from __future__ import annotations

from typing import Any

from litestar import WebSocket, websocket

from islandlink.channel import IslandChannel
from protocol import island as p


def channel_handler(channel: IslandChannel) -> Any:
    @websocket(p.CHANNEL_PATH, name="island_channel")
    async def island_channel(socket: WebSocket) -> None:
        await channel.serve(socket)

    return island_channel
