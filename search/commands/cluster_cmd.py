"""`prunetune cluster up --local | down | status`: a multi-node Ray cluster and tracking server on this machine.

``up --local`` starts a Ray head, ``--workers`` worker nodes and an MLflow server (cluster.local),
prints the Ray address and the tracking URI to pass to ``prunetune run --address ... --tracking-uri
...``, and records every process in the cluster directory (``--dir``, default
``$PRUNETUNE_CLUSTER_DIR`` or ``~/.prunetune/cluster``). ``down`` stops exactly those processes by
PID; ``status`` reports them. Clusters in the cloud or on Kubernetes start from cluster/configs/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from prunetune.pruning.errors import UserError
from prunetune.search.commands.common import positive_int

NAME = "cluster"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        NAME, help="start, stop and inspect a local multi-node Ray cluster with a tracking server",
        description="A real multi-node Ray cluster on this machine (a head and worker nodes, each its own "
                    "raylet) with an MLflow tracking server on the head, on loopback. For clusters in the "
                    "cloud or on Kubernetes see cluster/configs/ and the README.")
    actions = parser.add_subparsers(dest="cluster_action", metavar="ACTION", title="actions")
    actions.required = True

    up = actions.add_parser("up", help="start the cluster and its tracking server")
    up.add_argument("--local", action="store_true", help="run every node on this machine (required: the "
                    "cloud and Kubernetes start from cluster/configs/)")
    up.add_argument("--workers", type=positive_int, required=True, help="number of worker nodes")
    up.add_argument("--cpus-per-worker", type=positive_int, default=1, help="CPUs of each worker node (default 1)")
    up.add_argument("--gpus-per-worker", type=int, default=0,
                    help="GPUs of each worker node, disjoint GPUs of this machine (default 0)")
    up.add_argument("--tracking-backend", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the tracking server's store: sqlite in the cluster directory, or a PostgreSQL "
                         "started there (must be installed)")
    up.add_argument("--object-store-mb", type=positive_int, default=512,
                    help="object store of each node, MiB (default 512; holds the shared base model and data)")
    up.add_argument("--host", default="127.0.0.1", help="the address of the nodes and the tracking server "
                    "(default 127.0.0.1: reachable from this machine only)")
    up.add_argument("--no-auth", action="store_true", help="turn Ray's token authentication off: for local "
                    "tests on loopback only")
    up.add_argument("--json", action="store_true", help='print {"address", "tracking_uri", "driver_env"} as JSON')
    _add_dir(up)

    down = actions.add_parser("down", help="stop every process the cluster started (by PID)")
    _add_dir(down)

    status = actions.add_parser("status", help="show the cluster's nodes and servers")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    _add_dir(status)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to ``up``, ``down`` or ``status``."""
    return {"up": run_up, "down": run_down, "status": run_status}[args.cluster_action](args)


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="the cluster directory: state file, logs, tracking store "
                        "(default $PRUNETUNE_CLUSTER_DIR or ~/.prunetune/cluster)")


def _log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def run_up(args: argparse.Namespace) -> int:
    from prunetune.cluster.local import LocalClusterSpec, up
    from prunetune.cluster.loopback import is_loopback
    from prunetune.cluster.state import cluster_dir

    if not args.local:
        raise UserError("only local clusters start from this command: add --local; for the cloud run "
                        "`ray up cluster/configs/aws.yaml`, for Kubernetes `kubectl apply -f cluster/configs/kuberay.yaml`")
    if args.no_auth and not is_loopback(args.host):
        raise UserError(f"--no-auth is for local tests on loopback only; drop it or use --host 127.0.0.1 "
                        f"(got --host {args.host})")
    if args.no_auth:
        _log("warning: Ray's token authentication is off (--no-auth): any local user can use this cluster")
    if not is_loopback(args.host):
        _log(f"warning: the nodes and the tracking server use {args.host} and Ray listens on every interface; "
             f"the tracking server has no authentication: firewall them (README, 'Running on a cluster')")
    directory = cluster_dir(args.dir)
    spec = LocalClusterSpec(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                            gpus_per_worker=args.gpus_per_worker, backend=args.tracking_backend,
                            auth=not args.no_auth, host=args.host, object_store_mb=args.object_store_mb)
    state = up(directory, spec, log=_log)
    from prunetune.cluster.auth import driver_environment

    if args.json:  # driver_env: what a driver must export to join (scripts: env ... prunetune run)
        print(json.dumps({"address": state.address, "tracking_uri": state.tracking.uri,
                          "driver_env": driver_environment(state.auth)}))
        return 0
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in driver_environment(state.auth).items())
    print(f"Ray address:   {state.address}")
    print(f"tracking URI:  {state.tracking.uri}")
    print(f"cluster:       1 head + {args.workers} worker node{'s' if args.workers > 1 else ''} "
          f"({args.cpus_per_worker} CPU, "
          f"{args.gpus_per_worker} GPU each), tracking store {args.tracking_backend}, Ray auth "
          f"{state.auth.mode}; state in {directory}")
    print(f"drivers need:  export {env}")
    print(f"next:          prunetune run --address {state.address} --tracking-uri {state.tracking.uri}   |   "
          f"prunetune cluster status --dir {directory}   |   prunetune cluster down --dir {directory}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from prunetune.cluster.local import down
    from prunetune.cluster.state import cluster_dir

    directory = cluster_dir(args.dir)
    stopped = down(directory, log=_log)
    if not stopped:
        print(f"no cluster runs from {directory}")
        return 0
    print(f"cluster stopped: {len(stopped)} processes ended, none left")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from prunetune.cluster.local import status
    from prunetune.cluster.state import cluster_dir

    directory = cluster_dir(args.dir)
    report = status(directory)
    if report is None:
        if args.json:
            print(json.dumps({"dir": str(directory), "state": "none"}))
        else:
            print(f"no cluster recorded in {directory}; start one with `prunetune cluster up --local --workers N`")
        return 0
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"cluster in {report['dir']}: {report['state']}")
    print(f"Ray address {report['address']} (auth {report['auth']}), tracking URI {report['tracking_uri']} "
          f"({report['tracking_backend']}, {'healthy' if report['tracking_healthy'] else 'not answering'})")
    for node in report["nodes"]:
        print(f"  {node['name']:<14} pid {node['pid']:<8} {'running' if node['running'] else 'stopped':<8} "
              f"{node['cpus']} CPU {node['gpus']} GPU  node {str(node['node_id'])[:8]}  "
              f"{node['processes']} processes")
    for service in report["services"]:
        print(f"  {service['name']:<14} pid {service['pid']:<8} {'running' if service['running'] else 'stopped'}")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in report["driver_env"].items())
    print(f"drivers need: export {env}")
    return 0
