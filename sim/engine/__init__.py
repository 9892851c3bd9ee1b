"""The SimPy model of one point, split into its entities.

    client.py     clients and agents: plain generator processes (`decode_client`, `agent`) that open
                  a session, ask the backend for a plan of each generate call and send its requests
    link.py       the client <-> server link: a full-duplex pair of shared pipes
    server.py     `GpuServer`: owns its GPU memory, PCIe pipes, executor and the sessions' server state;
                  serves one planned request (memory admission, weight load, copies, execution)
    plan.py       the typed plan of a backend: what a request computes, moves and does to the KV cache
    executors.py  GPU scheduling policies, in a registry keyed by their YAML tag
    kvpolicy.py   what a session's KV does during ACT (preserve, swap, discard, ttl, min_waste), a
                  registry keyed by its YAML tag; the server carries the decisions out
    pipe.py       processor-sharing bandwidth (virtual clock + heap of finish tags)
    memory.py     GPU memory accounting with heap-ordered waits
    world.py      wires one point together and runs its environment (the one `env.run()` call)

Nothing here knows a backend's name: backends reach the engine only as plans (`plan.py`).
"""
