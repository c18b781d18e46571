#!/usr/bin/env python3
"""Checks deploy/ beyond the Kubernetes schemas (which kubernetes-validate covers):

- every YAML file under deploy/ parses, and each document has what its kind
  needs (apiVersion/kind for Kubernetes and Istio objects, static_resources
  for an Envoy bootstrap, groups or tests for a plain Prometheus rule file);
- the broker.toml inside the ConfigMap is a configuration the broker accepts:
  `payroc-broker check-config` on a copy whose key-file paths point at the
  example Secret's values written to a scratch directory;
- the Deployment, ConfigMap and Secret agree (mount paths, ports, names),
  and so do the Service and NetworkPolicy for every port the broker listens
  on; TLS files and the probes' CA come from the Secret (the example's
  placeholders are replaced by a scratch CA and certificate, made with
  openssl, for check-config), and the probes speak TLS exactly when the
  configuration does;
- the Envoy bootstrap and Istio objects point at the broker's port and
  Payroc's API host;
- the Dockerfile's dependency layer leaves a manifest Cargo accepts: its
  stub-making RUN is replayed on a copy of what the build stage COPYs, with
  `cargo build` standing for a manifest parse and a look for every declared
  target's file (no Docker engine here, and a declared target without a
  file fails the image build).

Usage: check_deploy.py BROKER_BINARY SCRATCH_DIR
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import yaml

DEPLOY = "deploy"
PAYROC_API_HOST = "api.payroc.com"


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        try:
            return [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{path}: not valid YAML: {e}")


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        fail(f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) of the build stage (up to the second FROM),
    with line continuations joined and comment lines dropped as Docker does."""
    instructions, current = [], ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.lstrip().startswith("#") or (not current and not line.strip()):
                continue
            if line.endswith("\\"):
                current += line[:-1]
                continue
            current += line
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    froms = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[froms[0] : froms[1]] if len(froms) > 1 else instructions


def check_dependency_layer(scratch):
    """Replays the build stage up to its first `cargo build` in SCRATCH_DIR/docker,
    where `cargo` only parses the manifest: Cargo must accept it."""
    work = os.path.join(scratch, "docker")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "bin"))
    src = os.path.join(work, "src-root")
    os.makedirs(src)
    real_cargo = shutil.which("cargo")
    shim = os.path.join(work, "bin", "cargo")
    with open(shim, "w", encoding="utf-8") as f:
        # A package spec that matches nothing: Cargo loads the manifest (and
        # fails on a target file it has to search for) before it reports the
        # spec. Targets with an explicit `path` are only read when compiled,
        # so their files are looked for in `cargo metadata`.
        f.write(
            f"""#!{sys.executable}
import json, os, subprocess, sys
probe = subprocess.run([{real_cargo!r}, "build", "--offline", "--locked", "-p", "manifest-probe"],
                       capture_output=True, text=True)
if "did not match any packages" not in probe.stderr:
    sys.exit(probe.stderr)
meta = subprocess.run([{real_cargo!r}, "metadata", "--no-deps", "--offline", "--format-version", "1"],
                      capture_output=True, text=True, check=True)
missing = [t["src_path"] for p in json.loads(meta.stdout)["packages"] for t in p["targets"]
           if not os.path.exists(t["src_path"])]
if missing:
    sys.exit("declared targets without a file: " + ", ".join(missing))
"""
        )
    os.chmod(shim, 0o755)
    env = dict(os.environ, PATH=f"{os.path.dirname(shim)}:{os.environ['PATH']}")
    for word, rest in dockerfile_instructions("Dockerfile"):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            env[name] = shlex.split(value)[0] if value else ""
        elif word == "COPY":
            if rest.startswith("--"):
                fail(f"Dockerfile: COPY {rest}: options are not replayed here")
            *sources, dest = shlex.split(rest)
            target = os.path.normpath(os.path.join(src, dest))
            for source in sources:
                if os.path.isdir(source):
                    shutil.copytree(source, os.path.join(target, os.path.basename(source.rstrip("/")))
                                    if dest.endswith("/") else target, dirs_exist_ok=True)
                else:
                    os.makedirs(target if dest.endswith("/") else os.path.dirname(target), exist_ok=True)
                    shutil.copy(source, target)
        elif word == "RUN" and "cargo build" in rest:
            out = subprocess.run(["sh", "-c", rest], cwd=src, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                fail(f"Dockerfile: the dependency layer's RUN fails:\n{out.stderr}")
            print("Dockerfile: the dependency layer's stubs satisfy Cargo.toml")
            return
    fail("Dockerfile: no RUN with `cargo build` in the build stage")


def make_certificate(key_dir, server_name, cert_file, key_file, ca_files):
    """A scratch CA and a server certificate for `server_name` signed by it,
    written over the example Secret's placeholders in `key_dir`."""
    def openssl(*args):
        out = subprocess.run(["openssl", *args], cwd=key_dir, capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"openssl {args[0]}: {out.stderr}")

    ca_key, ca_crt = "scratch-ca.key", "scratch-ca.crt"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", ca_key, "-out", ca_crt, "-days", "1", "-subj", "/CN=check_deploy CA")
    key, csr = os.path.basename(key_file), "scratch.csr"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN={server_name}")
    with open(os.path.join(key_dir, "scratch.ext"), "w", encoding="utf-8") as f:
        f.write(f"subjectAltName=DNS:{server_name}\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "1", "-extfile", "scratch.ext", "-out", os.path.basename(cert_file))
    os.chmod(os.path.join(key_dir, key), 0o600)
    for ca in ca_files:
        shutil.copy(os.path.join(key_dir, ca_crt), os.path.join(key_dir, os.path.basename(ca)))


def main():
    broker, scratch = sys.argv[1], os.path.abspath(sys.argv[2])
    os.makedirs(scratch, exist_ok=True)

    files = sorted(glob.glob(f"{DEPLOY}/**/*.yaml", recursive=True))
    if not files:
        fail("no YAML under deploy/")
    docs = {}
    for path in files:
        docs[path] = load_all(path)
        for d in docs[path]:
            if path.startswith(f"{DEPLOY}/envoy/"):
                if "static_resources" not in d:
                    fail(f"{path}: an Envoy bootstrap needs static_resources")
            elif path.startswith(f"{DEPLOY}/prometheus/") and "kind" not in d:
                # Plain rule files and their unit tests: promtool checks them.
                if "groups" not in d and "tests" not in d:
                    fail(f"{path}: neither Prometheus rule groups nor promtool tests")
            elif not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")):
                fail(f"{path}: a document without apiVersion, kind or metadata.name")
        print(f"parsed {path}: {len(docs[path])} document(s)")

    k8s = [d for p, ds in docs.items() if p.startswith(f"{DEPLOY}/kubernetes/") for d in ds]
    deployment = by_kind(k8s, "Deployment")
    configmap = by_kind(k8s, "ConfigMap")
    secret = by_kind(k8s, "Secret")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    # Volumes: the ConfigMap and Secret the pod mounts are the ones here.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    cm_volume = next(n for n, v in volumes.items() if "configMap" in v)
    secret_volume = next(n for n, v in volumes.items() if "secret" in v)
    if volumes[cm_volume]["configMap"]["name"] != configmap["metadata"]["name"]:
        fail("the Deployment mounts another ConfigMap")
    if volumes[secret_volume]["secret"]["secretName"] != secret["metadata"]["name"]:
        fail("the Deployment mounts another Secret")
    if any("subPath" in m for m in container["volumeMounts"]):
        fail("subPath mounts are never updated in place: key rotation would not reach the pod")
    config_path = container["args"][container["args"].index("--config") + 1]
    if os.path.dirname(config_path) != mounts[cm_volume]:
        fail(f"--config {config_path} is not in the ConfigMap mount {mounts[cm_volume]}")
    toml_text = configmap["data"][os.path.basename(config_path)]

    # Ports: probes, metrics annotation and config agree.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(re.search(r'^listen = "[^"]*:(\d+)"', toml_text, re.M).group(1))
    metrics_port = int(re.search(r'^metrics_listen = "[^"]*:(\d+)"', toml_text, re.M).group(1))
    if ports["grpc"] != listen_port or ports["metrics"] != metrics_port:
        fail(f"container ports {ports} do not match listen {listen_port} / metrics_listen {metrics_port}")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    if int(annotations["prometheus.io/port"]) != metrics_port:
        fail("prometheus.io/port is not metrics_listen's port")
    tls = re.search(r"^\[server\.tls\]$", toml_text, re.M) is not None
    probe_cas = set()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        if "grpc" in spec:
            # Kubelet's native gRPC probe speaks cleartext only.
            if tls:
                fail(f"{probe}: a native grpc probe cannot speak TLS, and [server.tls] is set")
            if spec["grpc"]["port"] != listen_port:
                fail(f"{probe} does not probe the gRPC port")
            continue
        command = spec.get("exec", {}).get("command", [])
        if command[1:2] != ["health"]:
            fail(f"{probe}: neither a grpc probe nor `payroc-broker health`")
        flags = dict(zip(command[2::2], command[3::2]))
        scheme = "https" if tls else "http"
        if flags.get("--addr") != f"{scheme}://127.0.0.1:{listen_port}":
            fail(f"{probe}: --addr {flags.get('--addr')} is not {scheme}://127.0.0.1:{listen_port}")
        if tls:
            if "--tls-ca" not in flags or "--tls-server-name" not in flags:
                fail(f"{probe}: a TLS probe needs --tls-ca and --tls-server-name")
            probe_cas.add(flags["--tls-ca"])
            server_name = flags["--tls-server-name"]

    # The identity endpoint, when on, has its container port, and the Service
    # and NetworkPolicy let callers reach it as they reach gRPC.
    identity = re.search(r'^\[identity_endpoint\]\n(?:#.*\n)*listen = "[^"]*:(\d+)"', toml_text, re.M)
    client_ports = ["grpc"]
    if identity:
        client_ports.append("http-identity")
        if ports.get("http-identity") != int(identity.group(1)):
            fail(f"container port http-identity {ports.get('http-identity')} is not "
                 f"[identity_endpoint] listen's port {identity.group(1)}")
    service = by_kind(k8s, "Service", deployment["metadata"]["name"])
    service_ports = {p["targetPort"]: p for p in service["spec"]["ports"]}
    policy = by_kind(k8s, "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    for name in client_ports:
        if name not in service_ports:
            fail(f"the Service has no port for the container's {name}")
        if name not in allowed:
            fail(f"the NetworkPolicy lets nobody reach port {name}")
        if tls and service_ports[name].get("appProtocol") == "kubernetes.io/h2c":
            fail(f"Service port {name}: appProtocol kubernetes.io/h2c, but the port speaks TLS")

    # The configuration itself, as `payroc-broker check-config` sees it, with
    # each api_key_file read from the example Secret.
    keys_dir = mounts[secret_volume]
    key_dir = os.path.join(scratch, "keys")
    os.makedirs(key_dir, exist_ok=True)
    for name, value in secret.get("stringData", {}).items():
        path = os.path.join(key_dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(value)
    referenced = re.findall(r'^api_key_file = "([^"]+)"', toml_text, re.M)
    if not referenced:
        fail("the ConfigMap's broker.toml names no api_key_file")
    tls_files = dict(re.findall(r'^(cert_file|key_file|client_ca_file) = "([^"]+)"', toml_text, re.M))
    if tls and not {"cert_file", "key_file"} <= tls_files.keys():
        fail("[server.tls] without cert_file and key_file")
    for path in referenced + list(tls_files.values()) + sorted(probe_cas):
        if os.path.dirname(path) != keys_dir:
            fail(f"{path} is outside the Secret mount {keys_dir}")
        if os.path.basename(path) not in secret.get("stringData", {}):
            fail(f"{path}: the example Secret has no key {os.path.basename(path)}")
    if tls:
        # The example Secret holds placeholders: a CA and a certificate for
        # the probes' server name take their place, signed as a real one is.
        if shutil.which("openssl") is None:
            fail("openssl is needed to make a scratch certificate for [server.tls]")
        make_certificate(key_dir, server_name, tls_files["cert_file"], tls_files["key_file"],
                         sorted(probe_cas) + ([tls_files["client_ca_file"]] if "client_ca_file" in tls_files else []))
    local_toml = os.path.join(scratch, "broker.toml")
    with open(local_toml, "w", encoding="utf-8") as f:
        f.write(toml_text.replace(f'"{keys_dir}/', f'"{key_dir}/'))
    out = subprocess.run([broker, "check-config", "--config", local_toml], capture_output=True, text=True)
    print(out.stdout.strip())
    if out.returncode != 0:
        fail(f"check-config refused the ConfigMap's broker.toml:\n{out.stderr}")
    if "warning" in out.stderr:
        fail(f"check-config warns about the ConfigMap's broker.toml:\n{out.stderr}")

    # Envoy egress: ext_authz calls the broker over HTTP/2, upstream TLS to Payroc.
    (envoy,) = docs[f"{DEPLOY}/envoy/egress.yaml"]
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    text = yaml.safe_dump(envoy)
    if "envoy.filters.http.ext_authz" not in text:
        fail("the Envoy bootstrap has no ext_authz filter")
    authz_cluster = re.search(r"cluster_name: (\S+)", text).group(1)
    broker_cluster = clusters[authz_cluster]
    if str(listen_port) not in yaml.safe_dump(broker_cluster["load_assignment"]):
        fail("the Envoy ext_authz cluster does not point at the broker's port")
    if "http2_protocol_options" not in yaml.safe_dump(broker_cluster):
        fail("the Envoy ext_authz cluster must speak HTTP/2 (gRPC)")
    if tls != ("UpstreamTlsContext" in yaml.safe_dump(broker_cluster.get("transport_socket", {}))):
        fail("the Envoy ext_authz cluster must speak TLS to the broker exactly when [server.tls] is set")
    upstream = [c for n, c in clusters.items() if n != authz_cluster]
    if not any(
        "UpstreamTlsContext" in yaml.safe_dump(c.get("transport_socket", {})) and PAYROC_API_HOST in yaml.safe_dump(c)
        for c in upstream
    ):
        fail(f"no Envoy cluster originates TLS to {PAYROC_API_HOST}")

    # Istio: a CUSTOM policy whose provider is declared in meshConfig.
    istio = [d for p, ds in docs.items() if p.startswith(f"{DEPLOY}/istio/") for d in ds]
    policy = by_kind(istio, "AuthorizationPolicy")
    if policy["spec"]["action"] != "CUSTOM":
        fail("the Istio AuthorizationPolicy must use action CUSTOM")
    provider = policy["spec"]["provider"]["name"]
    mesh = by_kind(istio, "IstioOperator")
    providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    if provider not in providers or "envoyExtAuthzGrpc" not in providers[provider]:
        fail(f"meshConfig.extensionProviders has no envoyExtAuthzGrpc provider {provider!r}")
    if providers[provider]["envoyExtAuthzGrpc"]["port"] != listen_port:
        fail("the Istio extension provider does not point at the broker's port")
    print("deploy/: Kubernetes, Envoy and Istio files agree with each other and the broker")

    check_dependency_layer(scratch)


if __name__ == "__main__":
    main()
