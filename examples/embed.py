"""Run rtcsignal inside your own asyncio program and use its server-side API.

    python examples/embed.py            # serves ws://127.0.0.1:8083/signaling for 1 second
    PORT=0 python examples/embed.py     # any free port
"""

import asyncio
import os

import rtcsignal


async def main() -> None:
    service = rtcsignal.SignalingService(rtcsignal.Config(port=int(os.environ.get("PORT", "8083"))))

    def on_message(peer: rtcsignal.Peer, message: dict) -> dict | None:
        message.setdefault("via", "my-app")  # rewrite what is relayed; return None to drop
        return message

    service.hooks.on_message = on_message
    service.hooks.on_disconnect = lambda peer, reason: print("gone", peer.id, reason)
    await service.start()
    print(f"listening on port {service.port}")

    service.broadcast_to_all({"type": "notification", "message": "Server announcement"})
    print("clients:", service.clients_count())

    await asyncio.sleep(float(os.environ.get("SECONDS", "1")))
    await service.shutdown()  # every client gets close 1001
    print("stopped")


if __name__ == "__main__":
    asyncio.run(main())
