"""The Kubernetes API, as the pipeline's own tasks use it: the workspace PVC.

Inside a pod the client uses the pod's service account (in-cluster config, the
pod's namespace); elsewhere the current kubeconfig context (`KUBECONFIG`). API
failures become one-line `T2IError`s naming the object and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.common.errors import T2IError, first_line

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client():
    """(ApiClient, namespace): in-cluster when running in a pod, else the kubeconfig's
    current context. T2IError when neither is configured."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and _SA_NAMESPACE.is_file():
        config.load_incluster_config()
        return client.ApiClient(), _SA_NAMESPACE.read_text().strip()
    # KUBECONFIG read now (the client reads it once, at import).
    path = os.environ.get("KUBECONFIG") or None
    try:
        config.load_kube_config(config_file=path)
        _, context = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError, TypeError) as e:
        raise T2IError(
            f"no Kubernetes cluster configured ({first_line(e, 120)}): set KUBECONFIG or "
            "run inside the cluster"
        ) from e
    namespace = (context or {}).get("context", {}).get("namespace") or "default"
    return client.ApiClient(), namespace


def ensure_pvc(
    name: str,
    create: dict | None,
    api=None,
    namespace: str | None = None,
    shared: bool = False,
) -> str:
    """Make sure the PVC `name` exists; return what was done, in words.

    `create` (`pipeline.workspace_create`: size, storage_class, access_mode) creates
    it when it is missing (and an existing one is reused, whatever made it); None
    requires it to exist. An existing PVC whose access mode differs from the asked one
    is named. T2IError (one line) when it is missing and not to be created, when the
    API refuses (forbidden, quota), or when `shared` (train nodes, or pack or cache
    workers, on several nodes mount it) and it is not ReadWriteMany."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    if api is None:
        api, found_namespace = api_client()
        namespace = namespace or found_namespace
    core = client.CoreV1Api(api)
    try:
        existing = core.read_namespaced_persistent_volume_claim(name, namespace)
    except ApiException as e:
        if e.status != 404:
            raise T2IError(f"PVC {namespace}/{name}: cannot read it ({api_reason(e)})") from e
        existing = None
    if existing is not None:
        modes = list(existing.spec.access_modes or [])
        said = f"workspace PVC {namespace}/{name} exists ({', '.join(modes) or 'no access mode'})"
        if shared and "ReadWriteMany" not in modes:
            raise T2IError(
                f"{said}, but resources.train.nodes > 1, cache_workers > 1 and pack_workers > 1 "
                "need ReadWriteMany (pods on several nodes mount it): use an RWX storage "
                "class, or one node and one worker"
            )
        if create and create.get("access_mode") not in modes:
            said += f"; pipeline.workspace_create asks for {create.get('access_mode')}"
        return said
    if not create:
        raise T2IError(
            f"workspace PVC {namespace}/{name} does not exist: create it (kubectl apply -f "
            "pipelines/k8s/workspace-pvc.yaml) or set pipeline.workspace_create "
            "{size, storage_class} so the run creates it"
        )
    body = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "t2i"}),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=[create["access_mode"]],
            storage_class_name=create["storage_class"],
            resources=client.V1VolumeResourceRequirements(requests={"storage": create["size"]}),
        ),
    )
    try:
        core.create_namespaced_persistent_volume_claim(namespace, body)
    except ApiException as e:
        if e.status == 409:  # made meanwhile by another run: reuse it
            return f"workspace PVC {namespace}/{name} exists (created by another run meanwhile)"
        raise T2IError(
            f"workspace PVC {namespace}/{name}: cannot create it ({api_reason(e)}); create it "
            "yourself (pipelines/k8s/workspace-pvc.yaml) or fix the quota or permission"
        ) from e
    return (
        f"workspace PVC {namespace}/{name} created ({create['size']}, "
        f"{create['storage_class']}, {create['access_mode']})"
    )


def api_reason(e) -> str:
    """The API's own one-line reason for a failed call."""
    import json

    try:
        message = json.loads(e.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"HTTP {e.status}: {first_line(message or e.reason, 200)}"
