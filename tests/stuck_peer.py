"""Two RPC parties for tests/test_exit.py: rank 0 starts a request on rank 1 whose handler never
returns (as a dropped hospital's can: a late call for an RRef the server has released waits
forever for its object); rank 1 then shuts RPC down locally and prints how long that took.

    python tests/stuck_peer.py RANK PORT FLAG_FILE {bounded,unbounded}
"""

import os
import sys
import threading
import time

import torch.distributed.rpc as rpc


def wait_forever(flag_file: str) -> None:
    open(flag_file, "w").close()
    threading.Event().wait()


def main(rank: int, port: str, flag_file: str, mode: str) -> None:
    import stuck_peer  # by module name, so that the peer can unpickle the function

    from splitrpc import transport

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=60, _transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"party{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        rpc.rpc_async("party1", stuck_peer.wait_forever, args=(flag_file,))
    while not os.path.exists(flag_file):
        time.sleep(0.01)
    if rank == 0:
        time.sleep(1.0)  # let rank 1 start its shutdown while this peer is still connected
        os._exit(0)
    started = time.monotonic()
    if mode == "bounded":
        transport.stop_rpc(graceful=False, timeout_s=0)
    else:
        rpc.shutdown(graceful=False)
    print(f"{time.monotonic() - started:.2f}", flush=True)
    os._exit(0)  # as splitrpc.train.leave_worker does: the stuck handler's thread ends with the process


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
