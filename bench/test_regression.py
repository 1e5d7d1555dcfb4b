"""Regression benchmarks (pytest-benchmark): `make bench-check` compares them with the
committed baseline in bench/baseline/, `make bench-save` refreshes it.

* an activation-sized tensor's round trip over RPC (TensorPipe over TCP), against
  the same bytes' round trip over a plain TCP socket (the floor);
* one training step of split learning (server + 2 hospitals), DDP (2 ranks) and
  local training, for narrow VGG-11 and ResNet-20.

The pytest process is the server (rank 0) of a real RPC group whose two
hospitals are subprocesses, and rank 0 of a 2-rank DDP group whose other rank
steps in lockstep. Bytes per step go into ``extra_info``; timings are for
humans and `make bench-check`; CI checks only the bytes (tests/test_bench_bytes.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from bench.rpc_bytes import SIZES, wire_bytes
from bench.rpc_peer import echo
from bench.steps import MODELS, config, ddp_setup, ddp_step
from splitrpc import comm, transport

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_args() -> list[str]:
    return ["--cache-dir", str(REPO / ".cache" / "bench-data")]


@pytest.fixture(scope="session")
def rpc_group():
    """This process as the server of a split group with two hospital subprocesses, over TCP."""
    port = _free_port()
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "3",
            "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "TORCH_CPP_LOG_LEVEL": "FATAL"}
    cfg = config("resnet20", *_cache_args())
    hospitals = [subprocess.Popen([sys.executable, "-m", "splitrpc.train", *_train_args("resnet20", "split")],
                                  env={**base, "RANK": str(r)}, cwd=REPO, stdout=subprocess.DEVNULL)
                 for r in (1, 2)]
    saved = {k: os.environ.get(k) for k in base}
    os.environ.update({k: base[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK",
                                            "LOCAL_WORLD_SIZE")})
    os.environ["RANK"] = "0"
    coordinator = transport.Coordinator(0, 3, cfg.setup_timeout)
    coordinator.mark_ready()
    coordinator.wait_all_ready(cfg.setup_timeout)
    transport.start_rpc(cfg, 0, 3)
    try:
        yield coordinator
    finally:
        coordinator.finish()
        coordinator.wait_for_acknowledgements([transport.hospital_name(r) for r in (1, 2)], timeout_s=30)
        transport.stop_rpc(graceful=True, timeout_s=30)
        for p in hospitals:
            p.wait(timeout=60)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("RANK", None)


def _train_args(model: str, method: str) -> list[str]:
    from bench.steps import COMMON

    return [*COMMON, *MODELS[model], "--method", method, *_cache_args()]


@pytest.fixture(scope="session")
def tcp_echo():
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "bench.rpc_peer", str(port_file)], cwd=REPO)
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.05)
        sock = socket.create_connection(("127.0.0.1", int(port_file.read_text())))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield sock
        sock.close()
        proc.kill()


@pytest.mark.parametrize("size", list(SIZES))
def test_rpc_round_trip(benchmark, rpc_group, size):
    tensor = torch.zeros(SIZES[size] // 4)
    benchmark.extra_info["payload_bytes_per_call"] = 2 * comm.tensor_bytes(tensor)
    calls = 0

    def call():
        nonlocal calls
        calls += 1
        return rpc.rpc_sync("hospital1", echo, args=(tensor,))

    before = wire_bytes(comm.store_port())
    result = benchmark(call)
    after = wire_bytes(comm.store_port())
    assert result.shape == tensor.shape
    if before and after:  # the kernel's count (heartbeats of the group included), beside the payload
        benchmark.extra_info["tcp_bytes_per_call"] = (after[0] - before[0] + after[1] - before[1]) / calls


@pytest.mark.parametrize("size", list(SIZES))
def test_tcp_round_trip_floor(benchmark, tcp_echo, size):
    payload = bytes(SIZES[size])
    view = memoryview(bytearray(len(payload)))

    def round_trip():
        tcp_echo.sendall(payload)
        got = 0
        while got < len(payload):
            got += tcp_echo.recv_into(view[got:])
        return got

    benchmark.extra_info["payload_bytes_per_call"] = 2 * len(payload)
    assert benchmark(round_trip) == len(payload)


@pytest.mark.parametrize("model", list(MODELS))
def test_split_step(benchmark, rpc_group, model):
    from splitrpc.server import Server

    server = Server(config(model, *_cache_args()), rpc_group)
    participants = [(1, 0), (2, 0)]
    server.ledger.switch("train")
    steps = 0

    def step():
        nonlocal steps
        steps += 1  # warm-up rounds send bytes too, so count every call
        server.train_step(0, 0, participants, 0.05)

    benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    train = server.ledger.payload["train"]
    sent = sum(d["sent"] for d in train.values())
    received = sum(d["received"] for d in train.values())
    benchmark.extra_info["server_bytes_per_step"] = {"sent": sent / steps, "received": received / steps}
    benchmark.extra_info["samples_per_step"] = 256


@pytest.fixture(scope="module")
def ddp_group():
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": "1",
           "LOCAL_RANK": "0", "TORCH_CPP_LOG_LEVEL": "FATAL"}
    yield port, env


@pytest.mark.parametrize("model", list(MODELS))
def test_ddp_step(benchmark, ddp_group, model):
    port, env = ddp_group
    cfg = config(model, *_cache_args())
    peer = subprocess.Popen([sys.executable, "-m", "bench.ddp_peer", *_train_args(model, "ddp")], env=env, cwd=REPO)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    try:
        trainer = ddp_setup(cfg.replace(method="ddp"), rank=0)
        flag = torch.ones(1)

        def step():
            flag.fill_(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ddp_step(trainer)

        benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
        benchmark.extra_info["bucket_bytes_per_step"] = trainer.hook_state.bucket_bytes / trainer.steps
        benchmark.extra_info["samples_per_step"] = 256
        flag.fill_(0)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    finally:
        dist.destroy_process_group()
        peer.wait(timeout=60)


@pytest.mark.parametrize("model", list(MODELS))
def test_local_step(benchmark, model):
    from splitrpc.local import LocalTrainer

    cfg = config(model, *_cache_args()).replace(method="local", threads=2)
    torch.set_num_threads(2)
    trainer = LocalTrainer(cfg)
    benchmark.pedantic(trainer.train_step, args=(0, 0, [(1, 0), (2, 0)], 0.05), rounds=8, iterations=1,
                       warmup_rounds=1)
    benchmark.extra_info["samples_per_step"] = 256
    torch.set_num_threads(1)


def test_split_steps_sequential_prefetch(benchmark, rpc_group):
    """Two sequential steps (hospital1, then hospital2), the second one's activations prefetched
    while the first runs: the default engine's overlap."""
    from splitrpc import data, loop
    from splitrpc.server import Server

    cfg = config("resnet20", *_cache_args(), "--schedule", "sequential", "--epochs", "1000")
    server = Server(cfg, rpc_group)
    plan = data.epoch_plan([i["train_batches"] for i in server.info], cfg.schedule)
    server.loop = loop.Loop(cfg, plan, server.train_step, server.evaluate, who="server", quiet=True)
    server.ledger.switch("train")

    def two_steps():
        state = server.loop.state
        for _ in range(2):
            epoch, index = divmod(state["steps_done"], len(plan))
            server.train_step(epoch, index, plan[index], 0.05)
            state["steps_done"] += 1

    benchmark.pedantic(two_steps, rounds=6, iterations=1, warmup_rounds=1)
    benchmark.extra_info["prefetched_steps"] = server.log.prefetched
    benchmark.extra_info["samples_per_call"] = 256


def test_split_step_fp8(benchmark, rpc_group):
    """One parallel step with float8 activations and gradients at the cut."""
    from splitrpc.server import Server

    server = Server(config("resnet20", *_cache_args(), "--codec", "fp8"), rpc_group)
    server.ledger.switch("train")
    steps = 0

    def step():
        nonlocal steps
        steps += 1
        server.train_step(0, 0, [(1, 0), (2, 0)], 0.05)

    benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    train = server.ledger.payload["train"]
    benchmark.extra_info["server_bytes_per_step"] = {"sent": sum(d["sent"] for d in train.values()) / steps,
                                                     "received": sum(d["received"] for d in train.values()) / steps}
    benchmark.extra_info["samples_per_step"] = 256
