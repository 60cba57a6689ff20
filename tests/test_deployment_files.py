"""Static checks of the deployment files in docker/ and of the commands in docs/cluster.md.

Nothing here runs Docker or Kubernetes. The checks parse the files and compare them with
each other, with pyproject.toml, with the installed packages and with the ``hpo`` parser.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from orchestrator import submit
from orchestrator.spec import load_study

tomllib = pytest.importorskip("tomllib")

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKER = REPOSITORY / "docker"
COMPOSE_PATH = DOCKER / "compose.yaml"
DOCKERFILE_PATH = DOCKER / "Dockerfile"
KUBERAY_PATH = DOCKER / "kuberay-raycluster.yaml"
ENV_EXAMPLE_PATH = DOCKER / ".env.example"
CLUSTER_DOC_PATH = REPOSITORY / "docs" / "cluster.md"

PROJECT_IMAGE = "hpo-collapse"
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|PRIVATE_KEY", re.IGNORECASE)
VARIABLE_REFERENCE = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(?:(?::?[-?])[^}]*)?\}")
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):\?")

# Variables that the cluster commands read, the only ones the guide may export.
CLUSTER_VARIABLES = {submit.ADDRESS_VARIABLE, submit.TOKEN_VARIABLE, submit.TOKEN_PATH_VARIABLE}
# The test of tests/orchestrator/test_submit.py that runs each hpo command of the guide.
EXERCISED_BY = {
    "submit": "test_submit_study_end_to_end",
    "jobs": "test_status_logs_stop_of_a_job",
    "status": "test_status_logs_stop_of_a_job",
    "logs": "test_logs_follow_until_job_ends",
    "stop": "test_status_logs_stop_of_a_job",
    "export": "test_submit_study_end_to_end",
}


# Loading -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict:
    return yaml.safe_load(KUBERAY_PATH.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE_PATH.read_text()


def dockerfile_targets(text: str) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE))


def dockerfile_version_pins(text: str) -> dict[str, str]:
    """Return {distribution name: version} of the ``ARG <NAME>_VERSION=<version>`` lines."""
    pins = {}
    for name, version in re.findall(r"^ARG\s+([A-Z0-9_]+)_VERSION=(\S+)$", text, re.MULTILINE):
        pins[canonicalize_name(name.replace("_", "-"))] = version
    return pins


def project_requirements() -> dict[str, Requirement]:
    pyproject = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
    requirements = [Requirement(text) for text in pyproject["project"]["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def service_environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def strings_in(node) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings_in(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings_in(value)]
    return [node] if isinstance(node, str) else []


# docker/compose.yaml -----------------------------------------------------------------------


def test_compose_services(compose):
    assert set(compose["services"]) == {"postgres", "mlflow", "ray-head", "ray-gpu-worker"}


def test_compose_depends_on_known_services(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_compose_dependencies_wait_for_health(compose):
    for name, service in compose["services"].items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"


def test_compose_every_service_has_healthcheck(compose):
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[0] in ("CMD", "CMD-SHELL"), name


def test_compose_named_volumes_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~", "$")):
                used.add(source)
    assert used == declared
    assert {"postgres-data", "mlflow-artifacts", "shared"} <= used


def test_compose_images_built_from_dockerfile_targets(compose, dockerfile):
    targets = dockerfile_targets(dockerfile)
    built = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            continue
        assert (COMPOSE_PATH.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE_PATH
        assert build["target"] in targets, f"{name} builds unknown target {build['target']}"
        assert service["image"] == f"{PROJECT_IMAGE}:{build['target']}", name
        built[service["image"]] = build["target"]
    for name, service in compose["services"].items():
        if service["image"].startswith(f"{PROJECT_IMAGE}:"):
            assert service["image"] in built, f"{name} uses {service['image']}, which no service builds"
    assert set(built) == {f"{PROJECT_IMAGE}:cpu", f"{PROJECT_IMAGE}:gpu"}


def test_compose_secrets_only_from_environment(compose):
    for name, service in compose["services"].items():
        for key, value in service_environment(service).items():
            if SECRET_NAME.search(key):
                assert VARIABLE_REFERENCE.fullmatch(value), f"{name}: {key} is not a ${{VAR}} reference"
    # Credentials inside URLs must be references too.
    for text in strings_in(compose):
        for credentials in re.findall(r"://([^/@\s]+)@", text):
            password = credentials.split(":", 1)[1] if ":" in credentials else ""
            assert password == "" or VARIABLE_REFERENCE.fullmatch(password), text


def test_compose_requires_secrets(compose):
    text = COMPOSE_PATH.read_text()
    required = set(REQUIRED_VARIABLE.findall(text))
    assert {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"} <= required


def test_env_example_lists_required_variables_without_values():
    required = set(REQUIRED_VARIABLE.findall(COMPOSE_PATH.read_text()))
    assignments = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE_PATH.read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in required:
        assert name in assignments, f"{name} missing from docker/.env.example"
        assert assignments[name] == "", f"docker/.env.example sets a value for {name}"


def test_compose_ray_nodes_use_token_authentication(compose):
    for name in ("ray-head", "ray-gpu-worker"):
        environment = service_environment(compose["services"][name])
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_compose_gpu_worker_reserves_gpus(compose):
    devices = compose["services"]["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]


def test_compose_worker_joins_head(compose):
    head_command = compose["services"]["ray-head"]["command"]
    port = head_command[head_command.index("--port") + 1]
    worker_command = compose["services"]["ray-gpu-worker"]["command"]
    assert worker_command[worker_command.index("--address") + 1] == f"ray-head:{port}"


def test_compose_publishes_on_loopback_by_default(compose):
    published = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            assert re.match(r"\$\{[A-Z_]+_BIND:-127\.0\.0\.1\}:", mapping), f"{name}: {mapping}"
            published[name] = mapping.rsplit(":", 1)[1]
    # Only the dashboard (Ray Jobs API) and MLflow; never the GCS port.
    assert published == {"mlflow": "5000", "ray-head": "8265"}


def test_compose_mlflow_server_on_postgresql(compose):
    mlflow = compose["services"]["mlflow"]
    assert service_environment(mlflow)["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    command = mlflow["command"]
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert "mlflow-artifacts:/mlartifacts" in mlflow["volumes"]


# docker/Dockerfile -------------------------------------------------------------------------


def test_dockerfile_targets(dockerfile):
    assert {"base", "cpu", "gpu"} <= dockerfile_targets(dockerfile)


def test_dockerfile_pins_every_dependency(dockerfile):
    pins = dockerfile_version_pins(dockerfile)
    missing = set(project_requirements()) - set(pins)
    assert not missing, f"docker/Dockerfile pins no version of {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(project_requirements()))
def test_dockerfile_pin_matches_project(name, dockerfile):
    version = dockerfile_version_pins(dockerfile)[name]
    requirement = project_requirements()[name]
    assert requirement.specifier.contains(version, prereleases=True), f"{name} {version} outside {requirement}"
    installed = importlib.metadata.version(name)
    assert Version(installed) == Version(version), f"{name}: Dockerfile pins {version}, tests run with {installed}"


def test_dockerfile_uses_every_pin(dockerfile):
    arguments = re.findall(r"^ARG\s+([A-Z0-9_]+_VERSION)=", dockerfile, re.MULTILINE)
    install_lines = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    for argument in arguments:
        assert install_lines.count(f"${{{argument}}}") >= 1, f"{argument} is never used"


def test_dockerfile_python_matches_project(dockerfile):
    image = re.search(r"^ARG PYTHON_IMAGE=python:(\d+\.\d+)", dockerfile, re.MULTILINE).group(1)
    requires_python = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["requires-python"]
    assert Requirement(f"python{requires_python}").specifier.contains(image)


def test_dockerfile_bakes_no_secret(dockerfile):
    for line in dockerfile.splitlines():
        if re.match(r"\s*(ENV|ARG)\s", line):
            assert not SECRET_NAME.search(line), line


# docker/kuberay-raycluster.yaml ------------------------------------------------------------


def test_kuberay_kind_and_version(kuberay):
    assert kuberay["apiVersion"] == "ray.io/v1"
    assert kuberay["kind"] == "RayCluster"
    assert kuberay["spec"]["rayVersion"] == importlib.metadata.version("ray")


def test_kuberay_gpu_worker_group(kuberay):
    groups = kuberay["spec"]["workerGroupSpecs"]
    gpu_groups = [
        group for group in groups
        if any("nvidia.com/gpu" in container["resources"]["limits"] for container in group["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"].endswith(f"/{PROJECT_IMAGE}:gpu")


def test_kuberay_token_from_secret(kuberay, dockerfile):
    targets = dockerfile_targets(dockerfile)
    pods = [kuberay["spec"]["headGroupSpec"]] + kuberay["spec"]["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            environment = {item["name"]: item for item in container["env"]}
            assert environment["RAY_AUTH_MODE"]["value"] == "token"
            token = environment["RAY_AUTH_TOKEN"]
            assert "value" not in token
            assert token["valueFrom"]["secretKeyRef"]["key"] == "token"
            assert container["image"].rsplit(":", 1)[1] in targets


# docs/cluster.md ---------------------------------------------------------------------------


def code_blocks(language: str) -> list[list[str]]:
    text = CLUSTER_DOC_PATH.read_text()
    return [block.splitlines() for block in re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]


def is_marked(block: list[str]) -> bool:
    """Return True for a block whose first line marks it as needing Docker or a GPU."""
    return bool(block) and re.match(r"# needs (Docker|a GPU)", block[0]) is not None


def commands(block: list[str]) -> list[str]:
    return [line.strip() for line in block if line.strip() and not line.lstrip().startswith("#")]


def doc_hpo_commands() -> list[list[str]]:
    return [
        shlex.split(line)
        for block in code_blocks("sh")
        if not is_marked(block)
        for line in commands(block)
        if line.startswith("hpo ")
    ]


def hpo_parser() -> argparse.ArgumentParser:
    from orchestrator.cli import build_parser

    return build_parser()


def test_cluster_doc_has_commands():
    subcommands = {argv[1] for argv in doc_hpo_commands()}
    assert {"submit", "jobs", "status", "logs", "stop", "export"} <= subcommands


def test_cluster_doc_unmarked_commands_are_hpo_or_exports():
    for block in code_blocks("sh"):
        if is_marked(block):
            continue
        for line in commands(block):
            if line.startswith("hpo "):
                continue
            exported = re.match(r"export ([A-Z_]+)=", line)
            assert exported, f"docs/cluster.md: {line!r} is not an hpo command; mark its block '# needs Docker'"
            assert exported.group(1) in CLUSTER_VARIABLES, line


def test_cluster_doc_hpo_commands_parse(capsys):
    parser = hpo_parser()
    for argv in doc_hpo_commands():
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"docs/cluster.md: {shlex.join(argv)} is rejected by the parser: {capsys.readouterr().err}")
        assert callable(args.handler)


def test_cluster_doc_commands_exercised():
    test_source = (REPOSITORY / "tests" / "orchestrator" / "test_submit.py").read_text()
    for argv in doc_hpo_commands():
        test_name = EXERCISED_BY.get(argv[1])
        assert test_name is not None, f"no test runs 'hpo {argv[1]}' from docs/cluster.md"
        assert f"def {test_name}(" in test_source
        assert f'"{argv[1]}"' in test_source


def test_cluster_doc_docker_commands_are_marked():
    for block in code_blocks("sh"):
        for line in commands(block):
            if line.split()[0] in ("docker", "kubectl", "cp"):
                assert is_marked(block), f"docs/cluster.md: {line!r} needs Docker but its block is not marked"


def test_cluster_doc_compose_commands_match_stack(compose):
    for block in code_blocks("sh"):
        for line in commands(block):
            argv = shlex.split(line)
            if argv[:2] != ["docker", "compose"]:
                continue
            assert argv[argv.index("-f") + 1] == "docker/compose.yaml"
            assert argv[argv.index("--env-file") + 1] == "docker/.env"
            if "up" in argv:
                named = [word for word in argv[argv.index("up") + 1 :] if not word.startswith("-")]
                assert set(named) <= set(compose["services"])


def test_cluster_doc_study_is_valid(tmp_path):
    (block,) = code_blocks("yaml")
    assert block[0] == "# cluster-demo.yaml"
    path = tmp_path / "cluster-demo.yaml"
    path.write_text("\n".join(block) + "\n")
    spec = load_study(path)
    submit.check_study_for_cluster(spec)
    assert spec.name == "cluster-demo"
    for argv in doc_hpo_commands():
        if argv[1] in ("submit", "export"):
            assert argv[2] == "cluster-demo.yaml"


def test_cluster_doc_job_ids_have_submission_format():
    for argv in doc_hpo_commands():
        if argv[1] in ("status", "logs", "stop"):
            assert re.fullmatch(r"hpo-cluster-demo-\d{8}-\d{6}", argv[2]), argv

