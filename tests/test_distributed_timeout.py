"""``parallel.timeout_s`` reaches every process group of a 2 x 2 mesh (issue 23.3): torch gives the
dp and ep sub-groups its own 30-minute default, so a rank stalled in the forward kept its dp or ep
peers waiting half an hour; at world 2 every group is the world, so only 4 ranks show it."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.test_distributed import spawn

pytestmark = pytest.mark.slow

TIMEOUT_S = 3.0


def _timeout_worker(rank: int, world: int, out_dir: str) -> None:
    from moelab.distributed.runtime import init_from_env
    from moelab.train.config import ParallelConfig

    env = init_from_env(ParallelConfig(ep=2, timeout_s=TIMEOUT_S), 4)
    groups = {"world": dist.group.WORLD, "dp": env.mesh["dp"].get_group(), "ep": env.mesh["ep"].get_group(),
              "flat": env.flat.get_group()}
    result = {"timeouts": {name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                           for name, g in groups.items()},
              "sizes": {name: g.size() for name, g in groups.items()}}
    # mesh rows: ep groups {0, 1} {2, 3}, dp groups {0, 2} {1, 3}. Rank 1 stalls (as in a forward that
    # hangs); rank 0 waits for it in an ep collective, rank 3 in a dp collective.
    t0 = time.monotonic()
    try:
        if rank == 1:
            time.sleep(TIMEOUT_S + 12)
        elif rank == 0:
            dist.barrier(group=groups["ep"])
        elif rank == 3:
            dist.barrier(group=groups["dp"])
        result["error"] = None
    except Exception as e:  # the timeout: gloo's "Timed out waiting ..."
        result["error"] = str(e).splitlines()[0]
    result["waited_s"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(out_dir, f"rank{rank}.json.tmp"), os.path.join(out_dir, f"rank{rank}.json"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(os.path.exists(os.path.join(out_dir, f"rank{r}.json"))
                                                   for r in range(world)):
        time.sleep(0.1)
    os._exit(0)  # the stalled groups are broken: no orderly teardown


def test_every_group_of_a_2x2_mesh_gets_the_timeout_and_a_stalled_rank_fails_its_peers_in_time(tmp_path):
    spawn(4, _timeout_worker, str(tmp_path), tmp_path=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r in results:
        assert r["sizes"] == {"world": 4, "dp": 2, "ep": 2, "flat": 4}
        assert r["timeouts"] == {"world": TIMEOUT_S, "dp": TIMEOUT_S, "ep": TIMEOUT_S, "flat": TIMEOUT_S}
    for waiter in (0, 3):  # the ep peer and the dp peer of the stalled rank: failed after about timeout_s
        assert results[waiter]["error"] is not None, results[waiter]
        assert TIMEOUT_S - 0.5 < results[waiter]["waited_s"] < TIMEOUT_S + 6, results[waiter]
    assert results[2]["error"] is None
