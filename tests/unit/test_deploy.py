"""The compose file, the Prometheus config and the dashboards: valid, consistent, no secrets."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, need_binary

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DEPLOY = REPO / "deploy"


def _compose_config(*env: str) -> dict:
    """`docker-compose config` (Debian's docker-compose; no engine needed) with .env.example."""
    exe = need_binary("docker-compose")
    r = subprocess.run([exe, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config"],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={"PATH": "/usr/bin:/bin", **dict(e.split("=", 1) for e in env)})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_file_is_valid_for_docker_compose():
    cfg = _compose_config()
    want = {"vllm-transformer", "vllm-hybrid", "ssm-server", "gpu-exporter", "dcgm-exporter",
            "prometheus", "grafana", "locust-master", "locust-worker", "vllm-cpu-transformer",
            "vllm-cpu-hybrid", "ssm-server-cpu", "loadgen"}
    assert want <= set(cfg["services"])


def test_compose_file_validates_against_the_compose_specification_schema():
    import jsonschema

    schema_path = "/usr/lib/python3/dist-packages/compose/config/compose_spec.json"
    need_binary("docker-compose")
    schema = json.loads(open(schema_path).read())
    jsonschema.validate(yaml.safe_load(COMPOSE.read_text()), schema)


def test_vllm_services_run_the_launch_profiles_of_the_env_presets():
    s = _compose_config()["services"]
    env = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#"))
    for svc, preset, device in [("vllm-transformer", env["TRANSFORMER_PRESET"], "--gpu"),
                                ("vllm-hybrid", env["HYBRID_PRESET"], "--gpu"),
                                ("vllm-cpu-transformer", env["CPU_TRANSFORMER_PRESET"], "--cpu"),
                                ("vllm-cpu-hybrid", env["CPU_HYBRID_PRESET"], "--cpu")]:
        assert s[svc]["entrypoint"] == ["python3", "-m", "servers.vllm_launch"], svc
        cmd = s[svc]["command"]
        assert cmd[:2] == ["--exec", preset] and device in cmd, (svc, cmd)
        assert any(v.endswith(":/opt/ctxload/servers:ro") or v.get("target") == "/opt/ctxload/servers"
                   for v in [x if isinstance(x, str) else x for x in s[svc]["volumes"]]
                   if isinstance(v, (str, dict))), svc
        # the launcher parses this command line (all but the preset's model directory build)
    from servers import vllm_launch
    import argparse

    p = argparse.ArgumentParser()
    vllm_launch.add_arguments(p)
    args = p.parse_args(s["vllm-hybrid"]["command"] + ["--print"])
    assert args.model == env["HYBRID_PRESET"] and args.gpu_memory_budget == env["GPU_MEMORY_BUDGET"]
    assert args.host == "0.0.0.0" and args.port == 8000


def test_ports_bind_loopback_by_default_and_healthchecks_order_the_start():
    s = _compose_config()["services"]
    for name, svc in s.items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", (name, port)
    assert s["vllm-hybrid"]["depends_on"]["vllm-transformer"]["condition"] == "service_healthy"
    assert s["ssm-server"]["depends_on"]["vllm-hybrid"]["condition"] == "service_healthy"
    assert s["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("vllm-transformer", "vllm-hybrid", "ssm-server", "prometheus", "grafana", "gpu-exporter"):
        assert "healthcheck" in s[name], name


def test_profiles_select_gpu_dcgm_or_cpu_stacks():
    s = _compose_config()["services"]
    assert s["gpu-exporter"]["profiles"] == ["gpu"] and s["dcgm-exporter"]["profiles"] == ["dcgm"]
    for name in ("vllm-transformer", "vllm-hybrid", "ssm-server"):
        assert set(s[name]["profiles"]) == {"gpu", "dcgm"}
    for name, alias in [("vllm-cpu-transformer", "vllm-transformer"), ("vllm-cpu-hybrid", "vllm-hybrid"),
                        ("ssm-server-cpu", "ssm-server")]:
        assert s[name]["profiles"] == ["cpu"] and alias in s[name]["networks"]["default"]["aliases"]
    for name in ("prometheus", "grafana"):
        assert "profiles" not in s[name], name
    assert s["locust-master"]["profiles"] == s["locust-worker"]["profiles"] == ["load"]
    assert s["loadgen"]["profiles"] == ["headless"]


def test_grafana_has_no_password_in_the_repo_and_anonymous_viewers_read_only():
    g = _compose_config()["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in g
    assert g["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert g["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and g["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for line in (COMPOSE.read_text() + ENV_EXAMPLE.read_text()).splitlines():
        m = re.match(r"\s*([A-Z_]*(?:PASSWORD|TOKEN|SECRET)[A-Z_]*)\s*[:=]\s*(.*)$", line)
        if m and not m.group(1).endswith("_FILE"):
            value = m.group(2).strip()
            assert value in ("", '""') or re.fullmatch(r"\$\{\w+:-\}", value), f"literal secret: {line}"


def test_prometheus_config_is_valid_and_scrapes_every_service():
    promtool = need_binary("promtool")
    path = DEPLOY / "prometheus" / "prometheus.yml"
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load(path.read_text())
    targets = {t for job in cfg["scrape_configs"] for g in job.get("static_configs", []) for t in g["targets"]}
    services = _compose_config()["services"]
    for name, port in [("vllm-transformer", 8000), ("vllm-hybrid", 8000), ("ssm-server", 8000),
                       ("gpu-exporter", 9400), ("dcgm-exporter", 9400), ("locust-master", 9646),
                       ("loadgen", 9646)]:
        assert name in services and f"{name}:{port}" in targets, name

    # the workers connect to the master by its service name, on the port it binds
    master, worker = services["locust-master"]["command"][-1], services["locust-worker"]["command"]
    assert "--master-bind-host 0.0.0.0 --master-port 5557" in master
    assert worker == ["python", "-m", "loadgen.worker", "--master-host", "locust-master", "--master-port", "5557"]


def test_dashboards_are_what_the_generator_writes():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import make_dashboards
    finally:
        sys.path.pop(0)
    rendered = make_dashboards.render()
    on_disk = {p.name: p.read_text() for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}
    assert rendered == on_disk, "run `python deploy/grafana/make_dashboards.py` and commit"


def test_grafana_mounts_the_dashboards_that_ship_in_the_package():
    """Compose mounts deploy/grafana/dashboards, a link to ctxload/dashboards (the wheel's copy)."""
    mounts = [str(v).split(":") for v in _compose_config()["services"]["grafana"]["volumes"]]
    source = next(m[0] for m in mounts if m[1:2] == ["/var/lib/grafana/dashboards"])
    assert Path(source).resolve() == (REPO / "ctxload" / "dashboards").resolve()
    assert sorted(p.name for p in Path(source).glob("*.json")) == \
        ["ctxload-client.json", "ctxload-gpu.json", "ctxload-servers.json"]


def test_dashboards_use_only_contract_metric_names_and_the_provisioned_datasource():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    exprs = []
    for p in (DEPLOY / "grafana" / "dashboards").glob("*.json"):
        dash = json.loads(p.read_text())
        for panel in dash["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid
            exprs += [t["expr"] for t in panel["targets"]]
    contract = (REPO / "docs" / "contracts.md").read_text()
    one_query = '{__name__=~"(vllm|ssm):time_to_first_token_seconds_bucket"}'
    assert any(one_query in e for e in exprs)
    names = set()
    for e in exprs:
        names |= {f"ssm:{m}" for m in re.findall(r'\(vllm\|ssm\):(\w+?)(?:_bucket|_total)?"', e)}
        names |= set(re.findall(r"\b(ssm:\w+?|ctxload:client_\w+?)(?:_bucket|_total)?\b", e))
    for n in sorted(names):
        assert n.split(":")[1] in contract, f"{n} is not in docs/contracts.md §5"


def test_every_built_image_has_a_dockerfile_and_a_context_that_leaves_out_the_venvs():
    services = _compose_config()["services"]
    dockerfiles = {s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert dockerfiles == {"deploy/ctxload.Dockerfile", "deploy/ssm-server.Dockerfile"}
    for df in dockerfiles:
        ignore = (REPO / f"{df}.dockerignore").read_text().split()
        assert ignore[ignore.index("*")] == "*"  # everything out, then what the image copies
        allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        for line in (REPO / df).read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    src = src.rstrip("*")
                    assert any(src == a or src.startswith(a + "/") for a in allowed), \
                        f"{df} copies {src}, which the context leaves out"
