"""Every file in cluster/ is checked against what it relies on: KubeRay fields, the real CLI
(commands, options, configs, overrides), the real Serve import path, Ray's own schemas for
runtime envs, Serve configs and the VM launcher, and the Dockerfile's layout.

A manifest that names a command, option, config key or module that does not exist fails here,
not on a GPU cluster an hour into a rollout.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from pipelines import jobs
from pipelines.cli import app
from radjepa.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KINDS = {
    "raycluster.yaml": "RayCluster",
    "rayjob-ingest.yaml": "RayJob",
    "rayjob-pretrain.yaml": "RayJob",
    "rayjob-sweep.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}
WITH_GPU = {"raycluster.yaml", "rayjob-pretrain.yaml", "rayservice.yaml"}
SECRET_ENVS = {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "RADJEPA_DEID_SECRET"}  # fmt: skip


def _load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def _cluster_spec(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[doc["kind"]]  # fmt: skip


def _groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    return groups


def _gi(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", str(quantity))
    assert m, f"memory quantity {quantity!r} should be in Mi or Gi"
    return float(m[1]) / (1024 if m[2] == "Mi" else 1)


def _dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    return workdir


def _cli() -> Any:
    return typer.main.get_command(app)


def test_every_yaml_in_cluster_is_known_and_parses() -> None:
    found = {p.name for p in CLUSTER.glob("*.yaml")} | {p.name for p in CLUSTER.glob("*.yml")}
    expected = set(KINDS) | {"runtime_env.yaml", "serve-config.yaml", "autoscaler-vm.yaml"}
    assert found == expected, "a new cluster/ file needs a check here"
    for name in found:
        assert _load(name), name


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kuberay_manifest_fields(name: str) -> None:
    doc = _load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == KINDS[name]
    cluster = _cluster_spec(name, doc)
    import ray

    assert cluster["rayVersion"] == ray.__version__, "cluster and clients must run one Ray"
    images = set()
    gpu_groups = []
    for group_name, group in _groups(cluster):
        # KubeRay passes rayStartParams to `ray start` as strings; YAML ints are rejected
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group_name
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name}/{group_name}: no /dev/shm mount"
        empty = volumes[shm[0]["name"]]["emptyDir"]
        assert empty["medium"] == "Memory"
        assert 0 < _gi(empty["sizeLimit"]) <= 0.5 * _gi(limits["memory"]), "shm sized to memory"
        env = {e["name"]: e for e in container["env"]}
        for var in SECRET_ENVS:
            assert "secretKeyRef" in env[var]["valueFrom"], f"{name}/{group_name}: {var}"
            assert "value" not in env[var], "secrets never inline"
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(group_name)
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert container["image"].endswith("-gpu"), "GPU pods need the CUDA image"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    assert bool(gpu_groups) == (name in WITH_GPU), f"{name}: GPU groups {gpu_groups}"
    assert len({i.removesuffix("-gpu") for i in images}) == 1, f"one image, two variants: {images}"


@pytest.mark.parametrize("name", sorted(n for n, k in KINDS.items() if k == "RayJob"))
def test_rayjob_entrypoint_is_a_real_cli_call_with_real_configs(name: str) -> None:
    from ray.runtime_env import RuntimeEnv

    spec = _load(name)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "radjepa", "entrypoints use the console script installed in the image"
    cli = _cli()
    assert argv[1] in cli.commands, f"`radjepa {argv[1]}` is not a CLI command"
    command = cli.commands[argv[1]]
    # click parses exactly as the driver will: unknown options / missing required ones fail
    ctx = command.make_context(f"radjepa {argv[1]}", argv[2:])
    config, sets = ctx.params.get("config"), ctx.params.get("set_") or []
    if config is not None:
        assert str(config).startswith("configs/"), "configs resolve in the image's workdir"
        assert (REPO / config).is_file(), f"{config} does not exist"
    cfg = load_config(REPO / config if config else None, sets)  # every --set key/value valid
    gpus = sum(
        g.get("replicas", 0) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for _, g in _groups(spec["rayClusterSpec"])
        for c in g["template"]["spec"]["containers"]
    )
    if argv[1] == "pretrain" and gpus:
        assert cfg.train.num_workers == gpus, "one DDP rank per GPU the job's cluster starts"
    # the module behind the command imports (Ray, torch and all)
    importlib.import_module(f"pipelines.{argv[1]}")

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    # Ray's own validation (it checks a local working_dir exists: the image's copy is the repo)
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})
    assert spec["shutdownAfterJobFinishes"] is True
    # a stopped job ends its runs KILLED before SIGKILL, as one `radjepa submit` sends does
    from pipelines.jobs import STOP_GRACE_ENV, STOP_GRACE_S

    assert runtime_env["env_vars"][STOP_GRACE_ENV] == str(STOP_GRACE_S)


SERVE_CONFIG = "configs/serve.yaml"  # the one serve config of every cluster manifest


def _serve_apps() -> dict[str, dict[str, Any]]:
    """Every Serve config a cluster is deployed with: the RayService's serveConfigV2,
    `serve deploy cluster/serve-config.yaml` and `serve deploy serve/deploy.yaml`."""
    from ray.serve.schema import ServeDeploySchema

    rayservice = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    configs = {
        "rayservice.yaml": rayservice,
        "serve-config.yaml": _load("serve-config.yaml"),
        "serve/deploy.yaml": yaml.safe_load((REPO / "serve" / "deploy.yaml").read_text()),
    }
    for cfg in configs.values():
        ServeDeploySchema.model_validate(cfg)  # what `serve deploy` / KubeRay will accept
    return configs


def _effective_serve_config(args: dict[str, Any]) -> Any:
    """The config ``serve.deployment:build_app`` builds from ``args``, resolved as it does:
    the ``config`` file, its ``set`` overrides, then the args given as-is."""
    cfg = load_config(REPO / args["config"], list(args.get("set") or []))
    direct = {
        f"serve.{key}": args[key]
        for key in ("model", "head", "index", "api_keys_file")
        if args.get(key) is not None
    }
    return cfg.with_overrides(direct) if direct else cfg


def test_serve_configs_validate_and_agree() -> None:
    # the manifests ran on the built-in defaults (no `config`) and serve/deploy.yaml on
    # configs/serve.yaml, which had no keys file (build_app stopped: no API keys) and
    # use_gpu auto (CPU for good when the GPU group was still at 0)
    configs = _serve_apps()
    for name, cfg in configs.items():
        assert cfg["applications"] == configs["rayservice.yaml"]["applications"], (
            f"{name} and rayservice.yaml deploy different apps"
        )
        assert cfg["http_options"] == configs["rayservice.yaml"]["http_options"], name
        assert cfg["http_options"]["host"] == "0.0.0.0"
    (app,) = configs["rayservice.yaml"]["applications"]
    assert app["args"].get("config") == SERVE_CONFIG, "the cluster app reads configs/serve.yaml"
    assert not app["args"].get("set"), "settings belong in configs/serve.yaml, not the manifests"
    serve_cfg = _effective_serve_config(app["args"]).serve
    assert serve_cfg.api_keys_file, "no manifest sets RADJEPA_API_KEYS: keys come from a file"
    assert serve_cfg.use_gpu == "true", "auto picks CPU for good when the GPU group is at 0"
    assert not serve_cfg.insecure_local
    # the app's JSON 504 comes before the proxy's plain-text 408
    proxy_timeout = configs["rayservice.yaml"]["http_options"]["request_timeout_s"]
    assert proxy_timeout > serve_cfg.request_timeout_s


def test_serve_import_path_resolves_and_builds_the_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (application,) = _load("serve-config.yaml")["applications"]
    module_name, _, attr = application["import_path"].partition(":")
    if not (REPO / Path(*module_name.split("."))).with_suffix(".py").exists():
        pytest.xfail(f"{module_name} is not written yet")
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)
    import mlflow
    from ray.serve import Application
    from serve_helpers import make_checkpoint

    from pipelines.tracking import register_artifact_dir
    from serve.registry import ModelNotFound

    args = application["args"]
    model = args.get("model") or load_config(REPO / args["config"]).serve.model
    name, _, alias = model.removeprefix("models:/").partition("@")
    # the cluster's registry, here a sqlite store (MLFLOW_TRACKING_URI, as on the head)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(REPO)  # the Serve app's working dir: args name repo-relative paths
    # the pods mount the radjepa-api-keys Secret at args.api_keys_file: here the same layout
    # (keys -> ..data/keys, mode 0440 as defaultMode 0400 with fsGroup leaves it)
    args = {**args, "api_keys_file": str(_secret_volume(tmp_path / "api-keys", "k" * 32))}
    # the pods get RADJEPA_DEID_SECRET from the radjepa-deid Secret; the public key stands in
    # (a variable set here would not reach the workers of a Ray instance already running)
    args["set"] = [*args.get("set", []), "ingest.allow_development_key=true"]
    with pytest.raises(ModelNotFound, match=model):  # not registered yet: one clear line
        builder(args)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cluster", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(make_checkpoint(tmp_path / "ckpt")), "checkpoint")
    register_artifact_dir(uri, run.info.run_id, "checkpoint", name, alias=alias)
    built = builder(args)  # binds deployments; the model loads in replicas
    assert isinstance(built, Application)


def test_runtime_env_file_is_valid_and_holds_no_secrets() -> None:
    from ray.runtime_env import RuntimeEnv

    data = jobs.load_runtime_env_file(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**data)
    assert "working_dir" not in data, "`radjepa submit` sets the working dir itself"
    assert not SECRET_ENVS & set(data.get("env_vars", {}))
    sub = jobs.build_submission(["version"], working_dir=REPO, environ={})
    assert sub.runtime_env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"  # merged by default


def test_dockerfile_builds_both_variants_from_real_paths_as_non_root() -> None:
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311"
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in text  # the documented CUDA build
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in {"root", "0"}
    # the image's runs name the commit it was built from, by the names provenance reads
    from pipelines.provenance import GIT_COMMIT_ENV, GIT_SOURCE_ENV

    assert re.search(r"^ARG GIT_COMMIT=", text, re.M)
    assert f"{GIT_COMMIT_ENV}=${{GIT_COMMIT}}" in text and f"{GIT_SOURCE_ENV}=image" in text
    docs = (REPO / "docs" / "CLUSTER.md").read_text()
    assert docs.count("--build-arg GIT_COMMIT=$(git rev-parse HEAD)") == 2
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert "TORCH_SPEC" in runs[0] and "--index-url" in runs[0], "torch installs before the package"
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore, "context starts empty; only what the image copies is let in"


def test_vm_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("autoscaler-vm.yaml")
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    gpu = [t for t in types.values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    # the launcher's default profile goes to the head alone: a worker without one of its own
    # cannot read the s3:// shards it decodes or trains on
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert ":instance-profile/" in profile.get("Arn", ""), f"{name}: no IAM instance profile"
    assert any(o.startswith("--shm-size") for o in raw["docker"]["run_options"])
    assert raw["docker"]["worker_image"].endswith("-gpu")


MLFLOW_AND_STORE_ENVS = {
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
}


def _env_lists(node: Any) -> list[list[dict[str, Any]]]:
    if isinstance(node, dict):
        found = [node["env"]] if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_lists(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_lists(v)]
    return []


@pytest.mark.parametrize(
    "name",
    [
        "raycluster.yaml",
        "rayjob-ingest.yaml",
        "rayjob-pretrain.yaml",
        "rayjob-sweep.yaml",
        "rayservice.yaml",
    ],
)
def test_every_pod_that_talks_to_mlflow_gets_all_of_its_credentials(name: str) -> None:
    # an auth-enabled MLflow or a regional bucket refuses a pod given only some of them
    lists = _env_lists(_load(name))
    tracked = [
        {v["name"] for v in env}
        for env in lists
        if any(v["name"] == "MLFLOW_TRACKING_URI" for v in env)
    ]
    assert tracked, f"{name}: no container is given MLFLOW_TRACKING_URI"
    for names in tracked:
        assert MLFLOW_AND_STORE_ENVS <= names, sorted(MLFLOW_AND_STORE_ENVS - names)


# ray.io/v1 spec fields (ray-operator/apis/ray/v1/*_types.go), and the KubeRay release that
# added the ones newer than v1.0. A misspelt or too-new field is refused by `kubectl apply`
# (strict field validation) or dropped without a word by an older CRD.
KUBERAY_SPEC_FIELDS = {
    "RayCluster": {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"},
    "RayJob": {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "jobId",
               "metadata", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "suspend",
               "activeDeadlineSeconds", "backoffLimit", "submissionMode", "submitterPodTemplate",
               "submitterConfig", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus"},
    "RayService": {"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy"},
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                       "rayStartParams", "template", "scaleStrategy"}  # fmt: skip
KUBERAY_SINCE = {
    ("RayJob", "activeDeadlineSeconds"): (1, 1),  # v1.1.0 release notes
    ("RayJob", "submissionMode"): (1, 1),
    ("RayJob", "backoffLimit"): (1, 2),  # v1.2.0: "Support retry in RayJob" (#2192)
}


def _documented_kuberay_minimum() -> tuple[int, int]:
    text = (REPO / "docs" / "CLUSTER.md").read_text()
    found = re.findall(r"KubeRay (?:operator )?>= ?(\d+)\.(\d+)", text)
    assert found, "docs/CLUSTER.md must name the oldest KubeRay the manifests work with"
    return max((int(a), int(b)) for a, b in found)


def test_manifest_fields_exist_in_the_kuberay_release_the_docs_ask_for() -> None:
    # docs/CLUSTER.md said "any 1.x that serves ray.io/v1"; the RayJobs use backoffLimit (1.2)
    minimum = _documented_kuberay_minimum()
    for name, kind in KINDS.items():
        doc = _load(name)
        unknown = set(doc["spec"]) - KUBERAY_SPEC_FIELDS[kind]
        assert not unknown, f"{name}: not a ray.io/v1 {kind} field: {sorted(unknown)}"
        for field_name in doc["spec"]:
            since = KUBERAY_SINCE.get((kind, field_name), (1, 0))
            assert since <= minimum, f"{name}: {field_name} needs KubeRay >= {since}"
        cluster = _cluster_spec(name, doc)
        assert not set(cluster) - KUBERAY_SPEC_FIELDS["RayCluster"], name
        assert not set(cluster["headGroupSpec"]) - HEAD_GROUP_FIELDS, name
        for group in cluster.get("workerGroupSpecs", []):
            assert not set(group) - WORKER_GROUP_FIELDS, f"{name}/{group['groupName']}"
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for path in CLUSTER.glob("*.yaml"):  # a comment that names a version names the same one
        for major, minor in re.findall(r"KubeRay >= ?(\d+)\.(\d+)", path.read_text()):
            assert (int(major), int(minor)) == minimum, (
                f"{path.name} says KubeRay >= {major}.{minor}"
            )


def test_gpu_rayjobs_release_their_cluster_soon_after_the_job_ends() -> None:
    # ttlSecondsAfterFinished is how long KubeRay keeps the job's RayCluster once the job is
    # over: 3600 held pretrain's four GPUs idle for an hour after every run, while the docs
    # promised GPUs "held only while a job runs". The submitter's logs outlive the cluster.
    for name in (n for n, k in KINDS.items() if k == "RayJob"):
        spec = _load(name)["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        assert isinstance(ttl, int) and ttl >= 0
        if name in WITH_GPU:
            assert ttl <= 300, f"{name}: GPUs held {ttl} s after the job ends"


def test_every_image_tag_is_the_package_version() -> None:
    # manifests, the VM launcher and the documented `docker build -t` name one image
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    # a rebuild gets the commit after the version (docs/CLUSTER.md section 3): IfNotPresent
    # pods never see a build pushed again under a tag their node has cached
    allowed = re.compile(rf"{re.escape(version)}(-[0-9a-f]{{7,40}})?(-gpu)?")
    texts = {p.name: p.read_text() for p in CLUSTER.glob("*.yaml")}
    texts["CLUSTER.md"] = (REPO / "docs" / "CLUSTER.md").read_text()
    texts["Dockerfile"] = (CLUSTER / "Dockerfile").read_text()
    for name, text in texts.items():
        tags = set(re.findall(r"/radjepa:([\w.-]+)", text))
        wrong = sorted(t for t in tags if not allowed.fullmatch(t))
        assert not wrong, f"{name}: image tags {wrong} (pyproject: {version})"
    assert {t for n, t in texts.items() if n.endswith(".yaml")} and all(
        f"radjepa:{version}" in texts[n] for n in KINDS
    )


SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def test_secret_looking_env_vars_come_from_secrets_everywhere() -> None:
    # e.g. RADJEPA_API_KEYS was checked nowhere: a literal `value:` would pass the suite
    for name in KINDS:
        for env in _env_lists(_load(name)):
            for var in env:
                if SECRET_NAME.search(var["name"]):
                    assert "value" not in var, f"{name}: {var['name']} written in the manifest"
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']}"
    _check_api_keys_volume()
    vm = _load("autoscaler-vm.yaml")
    options = " ".join(str(o) for o in vm["docker"].get("run_options", []))
    assert not re.search(r"(?:-e|--env)[ =]\S*(?:KEY|SECRET|TOKEN|PASSWORD)\S*=", options, re.I)
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert not any(SECRET_NAME.search(k) for k in runtime_env.get("env_vars", {}))


def _secret_volume(folder: Path, keys: str) -> Path:
    """A Kubernetes Secret volume holding ``keys``: the path the pod sees is ``folder/keys``."""
    (folder / "..2026_01").mkdir(parents=True)
    (folder / "..2026_01" / "keys").write_text(keys + "\n")
    (folder / "..2026_01" / "keys").chmod(0o440)
    (folder / "..data").symlink_to("..2026_01")
    (folder / "keys").symlink_to("..data/keys")
    return folder / "keys"


def _check_api_keys_volume() -> None:
    """Every RayService pod mounts the API keys Secret where build_app's api_keys_file points
    (build_app runs on the head, ingress replicas on any node with CPUs), read-only to others:
    a Secret volume defaults to 0644, and the service refuses a keys file others may write and
    warns on one every user may read."""
    (app,) = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])["applications"]
    keys_file = Path(_effective_serve_config(app["args"]).serve.api_keys_file)
    rayservice = _cluster_spec("rayservice.yaml", _load("rayservice.yaml"))
    for group_name, group in _groups(rayservice):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert "RADJEPA_API_KEYS" not in {e["name"] for e in container["env"]}, group_name
        (volume,) = [v for v in spec["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "radjepa-api-keys"
        mode = volume["secret"]["defaultMode"]
        assert not mode & 0o027, f"{group_name}: defaultMode {mode:o} lets others read or write"
        if mode & 0o040 == 0:  # 0400: only the fsGroup the kubelet adds lets uid 1000 read it
            assert spec["securityContext"]["fsGroup"], group_name
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert (mount["mountPath"], mount.get("readOnly")) == (str(keys_file.parent), True)


def _outputs(argv: list[str], params: dict[str, Any]) -> list[str]:
    """Where a manifest's command writes: ingest's DST, else train.output_dir."""
    if argv[1] == "ingest":
        return [params["paths"][-1]]
    cfg = load_config(REPO / params["config"] if params.get("config") else None,
                      list(params.get("set_") or []))  # fmt: skip
    return [cfg.train.output_dir]


@pytest.mark.parametrize("name", sorted(n for n, k in KINDS.items() if k == "RayJob"))
def test_rayjob_outputs_go_to_object_storage_not_pod_disk(name: str) -> None:
    # pods of a RayJob's cluster are deleted with it: a relative or local output dir is lost,
    # and training workers on other pods could not reach it in the first place
    argv = shlex.split(_load(name)["spec"]["entrypoint"])
    params = _cli().commands[argv[1]].make_context(f"radjepa {argv[1]}", argv[2:]).params
    for out in _outputs(argv, params):
        assert re.match(r"(s3|gs|gcs|abfss?)://", out), f"{name}: writes to {out!r}"


def _documented_radjepa_commands() -> list[tuple[str, list[str]]]:
    """Every `radjepa ...` line of the shell blocks in docs/CLUSTER.md and README.md, and of the
    usage comments in cluster/ (continuation lines joined, comments dropped)."""
    found = []
    sources = [REPO / "docs" / "CLUSTER.md", REPO / "README.md", *sorted(CLUSTER.glob("*.yaml"))]
    for path in sources:
        text = path.read_text()
        if path.suffix == ".md":
            lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).splitlines()
        else:  # "#   radjepa submit ..." usage lines in the header comments
            lines = [m for m in re.findall(r"^#\s+(radjepa .*)$", text, re.M)]
        joined, buf = [], ""
        for line in lines:
            buf += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                joined.append(buf.strip())
                buf = ""
        for line in joined:
            if line.startswith("radjepa "):
                argv = shlex.split(line, comments=True)[1:]
                ends = [i for i, a in enumerate(argv) if a in {"&", "&&", "|", "||", ";", ">"}]
                found.append((path.name, argv[: ends[0]] if ends else argv))
    return found


def _parse_cli_call(argv: list[str]) -> None:
    """Parse ``radjepa ARGV`` as click will (unknown commands/options fail), the command a
    ``submit`` carries included, and load the config and --set overrides it names."""
    cli = _cli()
    assert argv and argv[0] in cli.commands, f"`radjepa {argv[:1]}` is not a CLI command"
    command, rest = cli.commands[argv[0]], argv[1:]
    if hasattr(command, "commands"):  # a group: `radjepa jobs logs ...`
        assert rest and rest[0] in command.commands, f"`radjepa {argv[0]} {rest[:1]}`"
        command, rest = command.commands[rest[0]], rest[1:]
    params = command.make_context(f"radjepa {argv[0]}", rest).params
    if argv[0] == "submit":
        _parse_cli_call(list(params["command"]))
    elif params.get("config") or params.get("set_"):
        config = params.get("config")
        load_config(REPO / config if config else None, list(params.get("set_") or []))


def test_every_documented_radjepa_command_parses_with_the_real_cli() -> None:
    calls = _documented_radjepa_commands()
    assert {"CLUSTER.md", "README.md"} <= {name for name, _ in calls}
    assert any(argv[0] == "submit" for _, argv in calls)
    for name, argv in calls:
        try:
            _parse_cli_call(argv)
        except Exception as err:  # click's UsageError, a bad config or override
            pytest.fail(f"{name}: `radjepa {shlex.join(argv)}`: {err}")


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a context path: the last matching pattern wins ('!' re-includes)."""
    from fnmatch import fnmatchcase

    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!")
        if fnmatchcase(path, pat) or fnmatchcase(path, pat.removesuffix("/**")):
            allowed = negate
    return allowed


def test_the_build_context_holds_every_copied_path_and_no_venv() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    patterns = [
        line.strip()
        for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert _dockerignore_allows(src, patterns), f"COPY {src}: left out of the context"
    for heavy in (".venv", "runs", "demo-output", ".git", "tests"):
        assert not _dockerignore_allows(heavy, patterns), f"{heavy} is sent to the builder"


def _copied_bytes() -> int:
    """Bytes under the paths the Dockerfile copies (the image's /home/ray/radjepa)."""
    text = (CLUSTER / "Dockerfile").read_text()
    total = 0
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        for src in line.split()[:-1]:
            path = REPO / src
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            total += sum(f.stat().st_size for f in files if "__pycache__" not in f.parts)
    return total


def test_uploaded_working_dirs_stay_far_under_the_job_servers_limit(tmp_path: Path) -> None:
    # the job server takes 100 MiB per upload (docs/CLUSTER.md, troubleshooting). Two uploads:
    # `radjepa submit` zips the checkout with its excludes; a RayJob's submitter zips the
    # image's /home/ray/radjepa (runtimeEnvYAML working_dir), i.e. what the Dockerfile copies
    from ray._private.runtime_env.packaging import _zip_files

    limit = 100 * 1024**2
    sub = jobs.build_submission(["version"], working_dir=REPO, environ={})
    out = tmp_path / "pkg.zip"
    _zip_files(str(REPO), sub.runtime_env["excludes"], str(out), include_gitignore=True)
    assert out.stat().st_size < limit / 4, f"submit uploads {out.stat().st_size / 2**20:.1f} MiB"
    assert _copied_bytes() < limit / 4, f"a RayJob uploads {_copied_bytes() / 2**20:.1f} MiB"


def test_the_images_installed_cli_finds_the_configs_and_sample_it_ships(tmp_path: Path) -> None:
    # The Dockerfile's last `pip install`, run for real on a copy of what the image holds: a
    # regular install put the package in site-packages, so the `radjepa` script imported that
    # copy and `radjepa demo` (paths beside the package) read site-packages/configs/tiny_cpu.yaml
    # ("config file not found") though the image has /home/ray/radjepa/configs.
    import shutil
    import subprocess
    import sys
    import sysconfig

    text = (CLUSTER / "Dockerfile").read_text()
    workdir = tmp_path / "image"
    workdir.mkdir()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.M):
        for src in line.split()[:-1]:
            dest = workdir / src
            dest.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO / src, dest)
    (install,) = re.findall(r"^RUN pip install (--no-deps[^&\n]*?)\s*&&", text, re.M)
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip first uninstalled this checkout's own editable install
    # from the running environment (a --prefix install still removes the installed copy),
    # and every Ray worker started after this test failed "No module named 'pipelines'"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
         "--ignore-installed", "--prefix", str(prefix), *shlex.split(install)],
        cwd=workdir, check=True, capture_output=True,
    )  # fmt: skip
    (site_dir,) = prefix.glob("lib/python3*/site-packages")
    # -S and the environment's packages as a plain path entry: the dependencies import, but its
    # .pth files (this checkout's editable install among them) do not run; the image's do
    deps = sysconfig.get_paths()["purelib"]
    probe = (
        # the image's site first: both editable installs name their finder module alike
        f"import sys, site; site.addsitedir({str(site_dir)!r}); sys.path.append({deps!r})\n"
        "from pathlib import Path\n"
        "import pipelines.demo as demo\n"
        "demo.demo_config(Path('out'), 10)\n"
        "assert demo.SAMPLE.is_dir(), demo.SAMPLE\n"
        "print(demo.__file__)\n"
    )
    # run from elsewhere, as the console script does (its own folder first on sys.path)
    res = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()).is_relative_to(workdir)


def test_vm_nodes_start_ray_with_the_env_file_secrets(tmp_path: Path) -> None:
    """Jobs may not carry secrets (their record is public to dashboard users): on VMs the key
    reaches them through an env file each node's `ray start` reads; runs the real commands with
    a stub `ray` that prints what it was given."""
    import subprocess

    vm = _load("autoscaler-vm.yaml")
    env_file = "/home/ray/radjepa-env/radjepa.env"
    stub = tmp_path / "bin" / "ray"
    stub.parent.mkdir()
    stub.write_text(
        '#!/bin/sh\necho "$1 ${RADJEPA_DEID_SECRET:-unset} ${MLFLOW_TRACKING_PASSWORD:-unset}"\n'
    )
    stub.chmod(0o755)
    local = tmp_path / "radjepa.env"
    local.write_text("RADJEPA_DEID_SECRET=k3y\nMLFLOW_TRACKING_PASSWORD=pw\n")
    path = f"{stub.parent}:/usr/bin:/bin"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = vm[key][-1]
        assert env_file in start and start.index(env_file) < start.index("ray start"), key
        for present, expected in ((True, "start k3y pw"), (False, "start unset unset")):
            cmd = start.replace(env_file, str(local if present else tmp_path / "none.env"))
            out = subprocess.run(
                ["bash", "-c", cmd], env={"PATH": path}, capture_output=True, text=True
            )
            assert out.returncode == 0 and out.stdout.strip() == expected, (key, out)
    assert "pass-deid-secret" not in (CLUSTER / "autoscaler-vm.yaml").read_text()
