"""Checks that run before any trial: data, search space, tracking store, cluster resources.

Each check raises an ``InputError`` subclass with one line naming the value and the fix,
so ``hpo run`` exits with code 2 before it starts any work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import ClusterError, SpecError
from orchestrator.reliability import RetryPolicy
from orchestrator.spec import StudySpec
from orchestrator.tracking import Tracker, check_store_reachable
from search_spaces import SearchSpace, load_space
from trainables.data import check_dataset_available

logger = logging.getLogger(__name__)


def check_data(spec: StudySpec) -> None:
    """Raise DataError unless every dataset of the study can be found (or downloaded)."""
    for dataset in spec.datasets:
        check_dataset_available(dataset, spec.data.root, spec.data.download)


def load_cell_spaces(spec: StudySpec) -> dict[str, SearchSpace]:
    """Load the study's search space restricted to each loss; raise SpecError if one is empty."""
    space = load_space(spec.tuning.search_space)
    spaces = {}
    for loss in spec.losses:
        restricted = space.restrict({"loss": loss})
        if not restricted.parameters:
            raise SpecError(
                f"search space {spec.tuning.search_space} has no parameter for loss {loss}; "
                "add parameters without a 'when' condition or with one matching this loss"
            )
        if not any(parameter.name == "learning_rate" for parameter in restricted.parameters):
            raise SpecError(
                f"search space {spec.tuning.search_space} lacks 'learning_rate' for loss {loss}; "
                "every trial needs a learning rate"
            )
        spaces[loss] = restricted
    return spaces


def open_tracking(spec: StudySpec) -> Tracker:
    """Check the tracking store, create its schema and the experiment once, and return a Tracker."""
    uri = spec.resolved_tracking_uri
    check_store_reachable(uri)
    artifact_root = Path(spec.study_directory) / "mlartifacts"
    # Without a limit in the study file the Tracker reads HPO_TRACKING_OUTAGE_LIMIT_S.
    limit_s = spec.tracking.outage_limit_s
    policy = RetryPolicy(limit_s=limit_s) if limit_s is not None else None
    return Tracker(uri, spec.experiment_name, spec.name, artifact_root=artifact_root, retry_policy=policy)


def node_resources(nodes: list[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Return the total CPU and GPU of every alive node in ``ray.nodes()`` output."""
    return [
        {"CPU": float(node["Resources"].get("CPU", 0)), "GPU": float(node["Resources"].get("GPU", 0))}
        for node in nodes
        if node.get("Alive", node.get("alive", False))
    ]


def check_resources(spec: StudySpec, nodes: list[Mapping[str, Any]]) -> None:
    """Raise ClusterError unless one node can host a trial with the study's resources.

    Ray would otherwise keep an infeasible trial pending forever.
    """
    cpus = spec.resources.cpus_per_trial
    gpus = spec.resources.gpus_per_trial
    available = node_resources(nodes)
    if any(node["CPU"] >= cpus and node["GPU"] >= gpus for node in available):
        return
    largest_cpu = max((node["CPU"] for node in available), default=0)
    largest_gpu = max((node["GPU"] for node in available), default=0)
    if gpus > largest_gpu:
        fix = ("set resources.gpus_per_trial: 0 to train on CPUs" if largest_gpu == 0
               else f"set resources.gpus_per_trial to at most {largest_gpu:g}")
        raise ClusterError(
            f"resources.gpus_per_trial {gpus:g} is infeasible: the largest node of the Ray cluster "
            f"has {largest_gpu:g} GPUs; {fix} or add GPU nodes"
        )
    raise ClusterError(
        f"resources.cpus_per_trial {cpus:g} is infeasible: the largest node of the Ray cluster "
        f"has {largest_cpu:g} CPUs; set resources.cpus_per_trial to at most {largest_cpu:g} or add larger nodes"
    )


def connect_ray(spec: StudySpec) -> None:
    """Connect to the study's Ray cluster, or start a local one, unless already connected.

    Inside a Ray job ``RAY_ADDRESS`` is set and ``ray.init()`` joins that cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = spec.cluster.address
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None and "RAY_ADDRESS" not in os.environ:
        # "local" starts a private instance; without it Ray would join any cluster that
        # another program started on this machine (recorded under /tmp/ray).
        address = "local"
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {err}; "
            "check cluster.address (or RAY_ADDRESS) and the cluster's token"
        ) from err
    logger.info("connected to Ray: %s", ray.cluster_resources())
