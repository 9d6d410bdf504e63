"""The Redis implementation of ``core.broker.Broker``: many instances share rooms and presence
through one Redis (redis-py asyncio). I/O lives here, beside ``server/``; the core stays pure."""
