"""Two RPC parties for tests/test_exit.py: rank 0 sends a forward request inside a
distributed-autograd context and starts the backward pass; rank 1 (a hospital) leaves
while its part of that backward pass (a slow Python hook) still runs.

    python tests/exit_peer.py RANK PORT FLAG_FILE {leave,return}
"""

import os
import sys
import time

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc

HOOK_SECONDS = 2.0


class SlowGradientHook(torch.autograd.Function):
    """The hospital's end of the cut, with a backward pass that is still in Python when the process leaves."""

    @staticmethod
    def forward(ctx, x, flag_file):
        ctx.flag_file = flag_file
        return x.clone()

    @staticmethod
    def backward(ctx, gradient):
        open(ctx.flag_file, "w").close()
        time.sleep(HOOK_SECONDS)
        return gradient, None


LAYER = torch.nn.Linear(4, 4)


def hospital_forward(x, flag_file):
    return SlowGradientHook.apply(LAYER(x), flag_file)


def main(rank: int, port: str, flag_file: str, mode: str) -> int:
    import exit_peer  # by module name, so that the peer can unpickle the function

    from splitrpc import transport
    from splitrpc.train import leave_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=10, _transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"party{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        with dist_autograd.context() as context_id:
            out = rpc.rpc_sync("party1", exit_peer.hospital_forward, args=(torch.randn(2, 4), flag_file))
            try:
                dist_autograd.backward(context_id, [out.sum()])
            except RuntimeError:
                pass  # the hospital left in the middle of it, as it was told to
        transport.stop_rpc(graceful=False, timeout_s=0)
        return 0
    while not os.path.exists(flag_file):
        time.sleep(0.01)
    transport.stop_rpc(graceful=False, timeout_s=0)
    if mode == "leave":
        leave_worker(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
