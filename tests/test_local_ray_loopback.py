"""The local Ray a plain ``prunetune run`` starts listens on loopback only (``search.ray_session.start_ray``).

Ray's GCS, raylet and workers listen on every network interface unless the node's address is exactly
127.0.0.1, and ``ray.init()`` gives a local node the machine's outward address: a laptop's search was
reachable from its network, behind nothing but Ray's token.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, ray
from pathlib import Path
from prunetune.search.ray_session import new_temp_dir, remove_temp_dirs, start_ray
from tests.cluster_helpers import listening_sockets

def descendants(pid):
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found

temp_dir = new_temp_dir()
start_ray(address=None, temp_dir=temp_dir, num_cpus=1)
try:
    worker = ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process, listening too
    pids = descendants(os.getpid())
    from ray._private import services  # Ray's own rewrite of loopback addresses is back for later joins
    restored = services.resolve_ip_for_localhost.__module__ == "ray._private.services"
    print(json.dumps({"worker_seen": worker in pids, "sockets": listening_sockets(pids), "restored": restored}))
finally:
    ray.shutdown()
    remove_temp_dirs([temp_dir])
"""


def test_the_local_ray_of_a_search_listens_on_loopback_only():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["worker_seen"] and found["restored"]
    addresses = {address for address, _ in found["sockets"]}
    assert len(found["sockets"]) >= 3, found  # the GCS, the raylet, the driver's and the worker's core workers
    assert addresses == {"127.0.0.1"}, found
