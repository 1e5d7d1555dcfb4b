"""Intra-op threads by role: the server gets the host's cores, hospitals sharing its host one each."""

from splitrpc.config import parse_args
from splitrpc.transport import threads_for


def cfg(*args):
    return parse_args(["--dataset", "synthetic", *args])


def test_one_host_split_gives_the_server_every_core():
    split = cfg("--method", "split", "--hospitals", "2")
    # server + 2 hospitals on a 2-core host: the server 2, each hospital 1 (not 2 // 3 = 0 -> 1 for all)
    assert threads_for(split, 0, cores=2, local_processes=3) == 2
    assert threads_for(split, 1, cores=2, local_processes=3) == 1
    assert threads_for(split, 0, cores=16, local_processes=5) == 16


def test_hospitals_on_their_own_hosts_share_those_cores():
    split = cfg("--method", "split", "--hospitals", "4")
    assert threads_for(split, 0, cores=8, local_processes=1) == 8  # node 0: the server alone
    assert threads_for(split, 3, cores=8, local_processes=2) == 4  # a node with 2 of the 4 hospitals
    assert threads_for(split, 1, cores=8, local_processes=1) == 8


def test_overrides_and_other_methods():
    assert threads_for(cfg("--threads", "3"), 0, cores=2, local_processes=3) == 3
    assert threads_for(cfg("--threads", "3"), 2, cores=2, local_processes=3) == 3
    roles = cfg("--server-threads", "5", "--hospital-threads", "2")
    assert (threads_for(roles, 0, 2, 3), threads_for(roles, 1, 2, 3)) == (5, 2)
    assert threads_for(cfg("--method", "ddp", "--hospitals", "2"), 1, cores=2, local_processes=2) == 1
    assert threads_for(cfg("--method", "local"), None, cores=2, local_processes=1) == 2
