"""The Ray cluster: a local multi-node cluster, cloud and KubeRay configs, the tracking server."""
