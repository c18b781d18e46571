#!/usr/bin/env python3
"""Checks deploy/ beyond what kustomize and the Kubernetes schemas check.

  check_deploy.py render KUBECTL OUT_DIR
      `kubectl kustomize` each overlay of deploy/kubernetes (plain, istio,
      istio/mesh) into OUT_DIR/<name>.yaml, split into <name>.k8s.yaml (kinds
      Kubernetes has schemas for) and <name>.istio.yaml (Istio's CRDs, which
      kubernetes-validate has no schema for: structure-checked by `check`).
  check_deploy.py validate OUT_DIR K8S_VERSION...
      kubernetes-validate --strict on every <name>.k8s.yaml and each overlay's
      secret.example.yaml, per version; any warning fails too (a kind without
      a schema is only a warning there, and would go unvalidated).
  check_deploy.py check BROKER OUT_DIR SCRATCH_DIR
      on the rendered overlays:
      - every YAML file under deploy/ parses, each document has what its kind
        needs (a plain Prometheus rule file: groups or tests), and every file under deploy/kubernetes is named by a
        kustomization (or is an example that must not be applied);
      - each overlay's broker.toml (its ConfigMap) is a configuration the
        broker accepts: `payroc-broker check-config` on a copy whose key-file
        paths point at the overlay's example Secret written to a scratch
        directory (TLS placeholders replaced by a scratch CA and
        certificate, made with openssl); no overlay renders a Secret (an
        `apply -k` would overwrite the real one);
      - Deployment, ConfigMap and Secret agree (mount paths, ports, names),
        and so do the Service and NetworkPolicy (plain) or
        AuthorizationPolicy (istio) for every port callers use; the probes
        speak TLS exactly when the configuration does;
      - plain terminates TLS; istio has no broker TLS, believes XFCC from its
        own sidecar only, names callers by SPIFFE ID, serves ext_authz,
        injects the sidecar, makes mTLS STRICT and lets only named
        principals call Check; mesh/'s CUSTOM policy uses a provider that
        mesh-config.yaml declares on the broker's Service and port;
      - the Envoy bootstrap points at the plain overlay's broker port (TLS)
        and Payroc's API host;
      - the Dockerfile's dependency layer leaves a manifest Cargo accepts: its
        stub-making RUN is replayed on a copy of what the build stage COPYs,
        with `cargo build` standing for a manifest parse and a look for every
        declared target's file (no Docker engine here, and a declared target
        without a file fails the image build).
  check_deploy.py self-test KUBECTL BROKER SCRATCH_DIR
      on a copy of deploy/: the unchanged copy passes render, validate and
      check; then each planted error, one at a time, must make its stage
      fail with the expected message.

No Envoy or Istio binary here: their files are structure-checked, not run.
"""

import fnmatch
import glob
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import yaml

DEPLOY = "deploy"
PAYROC_API_HOST = "api.payroc.com"
# Each overlay's output name and directory under deploy/kubernetes.
OVERLAYS = {"plain": "overlays/plain", "istio": "overlays/istio", "istio-mesh": "overlays/istio/mesh"}
# Files under deploy/kubernetes that no kustomization names, on purpose: the
# Secret's shape (applying it would overwrite the real one) and meshConfig
# (merged into Istio's installation, not applied).
NOT_APPLIED = {"secret.example.yaml", "mesh-config.yaml"}
ISTIO_API = re.compile(r"^[a-z.]+\.istio\.io/")
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


class CheckFailed(Exception):
    """A problem found: main() prints it and exits 1; the self-test wants it."""


def fail(msg):
    raise CheckFailed(msg)


def load_all(path):
    with open(path, encoding="utf-8") as f:
        try:
            return [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{path}: not valid YAML: {e}")


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


def run_kustomize(kubectl, directory):
    """The documents `kubectl kustomize DIRECTORY` renders, and its YAML text.
    (Current kustomize warns on stderr that `bases:` and
    `patchesStrategicMerge:` are deprecated: they are what kustomize v2.0.3
    understands, so the warning is expected and not shown.)"""
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True)
    if out.returncode != 0:
        said = [line for line in out.stderr.splitlines() if "is deprecated" not in line]
        fail(f"kubectl kustomize {directory} failed:\n" + "\n".join(said).strip())
    try:
        return [d for d in yaml.safe_load_all(out.stdout) if d is not None], out.stdout
    except yaml.YAMLError as e:
        fail(f"kubectl kustomize {directory}: output is not YAML: {e}")


def render(kubectl, root, out_dir):
    """Renders every overlay into OUT_DIR (see the module's docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, sub in OVERLAYS.items():
        directory = os.path.join(root, "kubernetes", sub)
        docs, text = run_kustomize(kubectl, directory)
        if not docs:
            fail(f"{directory}: renders no documents")
        with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(text)
        istio = [d for d in docs if ISTIO_API.match(d.get("apiVersion", ""))]
        k8s = [d for d in docs if not ISTIO_API.match(d.get("apiVersion", ""))]
        for suffix, part in (("k8s", k8s), ("istio", istio)):
            path = os.path.join(out_dir, f"{name}.{suffix}.yaml")
            if os.path.exists(path):
                os.remove(path)
            if part:
                with open(path, "w", encoding="utf-8") as f:
                    yaml.safe_dump_all(part, f, sort_keys=False)
        kinds = lambda ds: ", ".join(sorted(d["kind"] for d in ds)) or "none"
        print(f"rendered {directory}: Kubernetes kinds: {kinds(k8s)}; Istio kinds (no schema "
              f"in kubernetes-validate; only `check` looks at them): {kinds(istio)}")


def validate(out_dir, root, versions):
    """kubernetes-validate --strict per version; any output under --quiet
    (a failure, or the warning that a kind has no schema) fails."""
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        fail("kubernetes-validate is not on PATH")
    files = sorted(glob.glob(os.path.join(out_dir, "*.k8s.yaml")))
    files += sorted(glob.glob(os.path.join(root, "kubernetes", "overlays", "**", "secret.example.yaml"),
                              recursive=True))
    if not files:
        fail(f"nothing to validate in {out_dir}")
    for version in versions:
        print(f"kubernetes-validate --strict -k {version} {' '.join(files)}")
        out = subprocess.run([tool, "--strict", "--quiet", "-k", version, *files],
                             capture_output=True, text=True)
        said = (out.stdout + out.stderr).strip()
        if out.returncode != 0 or said:
            fail(f"kubernetes-validate -k {version} (exit {out.returncode}):\n{said}")


def kustomization_files(directory):
    """Files a kustomization.yaml names (its own and its bases', recursively)."""
    path = os.path.join(directory, "kustomization.yaml")
    (k,) = load_all(path)
    named = {os.path.normpath(path)}
    for key in ("resources", "patchesStrategicMerge"):
        named |= {os.path.normpath(os.path.join(directory, f)) for f in k.get(key, [])}
    for gen in k.get("configMapGenerator", []):
        named |= {os.path.normpath(os.path.join(directory, f.split("=")[-1])) for f in gen.get("files", [])}
    for base in k.get("bases", []):
        named |= kustomization_files(os.path.join(directory, base))
    return named


def check_files(root):
    """Every YAML file under ROOT parses and has what its kind needs; every
    file under kubernetes/ is applied by some overlay, or is on purpose not."""
    files = sorted(glob.glob(f"{root}/**/*.yaml", recursive=True))
    if not files:
        fail(f"no YAML under {root}/")
    docs = {}
    for path in files:
        docs[path] = load_all(path)
        for d in docs[path]:
            if os.path.basename(path) == "kustomization.yaml":
                continue  # kustomize reads it: rendering checks it
            if path.startswith(f"{root}/envoy/"):
                if "static_resources" not in d:
                    fail(f"{path}: an Envoy bootstrap needs static_resources")
            elif path.startswith(f"{root}/prometheus/") and "kind" not in d:
                # Plain rule files and their unit tests: promtool checks them.
                if "groups" not in d and "tests" not in d:
                    fail(f"{path}: neither Prometheus rule groups nor promtool tests")
            elif not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name")):
                fail(f"{path}: a document without apiVersion, kind or metadata.name")
        print(f"parsed {path}: {len(docs[path])} document(s)")
    named = set()
    for sub in OVERLAYS.values():
        named |= kustomization_files(os.path.join(root, "kubernetes", sub))
    for path in glob.glob(f"{root}/kubernetes/**/*", recursive=True):
        if os.path.isfile(path) and os.path.normpath(path) not in named \
                and os.path.basename(path) not in NOT_APPLIED:
            fail(f"{path}: no overlay's kustomization names it (add it, or remove the file)")
    return docs


def pod_selected(selector, deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def istio_path_matches(pattern, path):
    """Istio's path forms: exact, `prefix*`, `*suffix`, `*`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return pattern == path


def check_overlay(name, docs, secret, broker, scratch):
    """The cross-checks of one rendered overlay against its example Secret
    and `check-config`. Returns (configuration text, tls, listen port,
    Deployment, Service)."""
    def by_kind(kind, wanted=None):
        found = [d for d in docs if d.get("kind") == kind and wanted in (None, d["metadata"]["name"])]
        if len(found) != 1:
            fail(f"{name}: expected one {kind} {wanted or ''}, found {len(found)}")
        return found[0]

    if any(d.get("kind") == "Secret" for d in docs):
        fail(f"{name}: renders a Secret: `kubectl apply -k` would overwrite the real one")
    deployment = by_kind("Deployment")
    configmap = by_kind("ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    # Volumes: the ConfigMap the pod mounts is the rendered one, the Secret
    # the one the example shows.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    cm_volume = next(n for n, v in volumes.items() if "configMap" in v)
    secret_volume = next(n for n, v in volumes.items() if "secret" in v)
    if volumes[cm_volume]["configMap"]["name"] != configmap["metadata"]["name"]:
        fail(f"{name}: the Deployment mounts another ConfigMap")
    if volumes[secret_volume]["secret"]["secretName"] != secret["metadata"]["name"]:
        fail(f"{name}: the Deployment mounts another Secret than secret.example.yaml's")
    if any("subPath" in m for m in container["volumeMounts"]):
        fail(f"{name}: subPath mounts are never updated in place: key rotation would not reach the pod")
    config_path = container["args"][container["args"].index("--config") + 1]
    if os.path.dirname(config_path) != mounts[cm_volume]:
        fail(f"{name}: --config {config_path} is not in the ConfigMap mount {mounts[cm_volume]}")
    if os.path.basename(config_path) not in configmap["data"]:
        fail(f"{name}: the ConfigMap has no {os.path.basename(config_path)}")
    toml_text = configmap["data"][os.path.basename(config_path)]
    try:
        config = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        fail(f"{name}: broker.toml is not TOML: {e}")
    server = config.get("server", {})

    # Ports: probes, metrics annotation and config agree.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listen_port = int(server["listen"].rsplit(":", 1)[1])
    metrics_port = int(server["metrics_listen"].rsplit(":", 1)[1])
    if ports["grpc"] != listen_port or ports["metrics"] != metrics_port:
        fail(f"{name}: container ports {ports} do not match listen {listen_port} / "
             f"metrics_listen {metrics_port}")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    if int(annotations["prometheus.io/port"]) != metrics_port:
        fail(f"{name}: prometheus.io/port is not metrics_listen's port")
    tls = "tls" in server
    probe_cas = set()
    server_name = None
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in container:
            fail(f"{name}: the container has no {probe}")
        spec = container[probe]
        if "grpc" in spec:
            # Kubelet's native gRPC probe speaks cleartext only.
            if tls:
                fail(f"{name}: {probe}: a native grpc probe cannot speak TLS, and [server.tls] is set")
            if spec["grpc"]["port"] != listen_port:
                fail(f"{name}: {probe} does not probe the gRPC port")
            continue
        command = spec.get("exec", {}).get("command", [])
        if command[1:2] != ["health"]:
            fail(f"{name}: {probe}: neither a grpc probe nor `payroc-broker health`")
        flags = dict(zip(command[2::2], command[3::2]))
        scheme = "https" if tls else "http"
        if flags.get("--addr") != f"{scheme}://127.0.0.1:{listen_port}":
            fail(f"{name}: {probe}: --addr {flags.get('--addr')} is not {scheme}://127.0.0.1:{listen_port}")
        if tls:
            if "--tls-ca" not in flags or "--tls-server-name" not in flags:
                fail(f"{name}: {probe}: a TLS probe needs --tls-ca and --tls-server-name")
            probe_cas.add(flags["--tls-ca"])
            server_name = flags["--tls-server-name"]

    # The identity endpoint, when on, has its container port, and the Service
    # lets callers reach it as they reach gRPC.
    client_ports = {"grpc": listen_port}
    if "identity_endpoint" in config:
        identity_port = int(config["identity_endpoint"]["listen"].rsplit(":", 1)[1])
        client_ports["http-identity"] = identity_port
        if ports.get("http-identity") != identity_port:
            fail(f"{name}: container port http-identity {ports.get('http-identity')} is not "
                 f"[identity_endpoint] listen's port {identity_port}")
    service = by_kind("Service", deployment["metadata"]["name"])
    service_ports = {p["targetPort"]: p for p in service["spec"]["ports"]}
    for port in client_ports:
        if port not in service_ports:
            fail(f"{name}: the Service has no port for the container's {port}")
    h2c = service_ports["grpc"].get("appProtocol") == "kubernetes.io/h2c"
    if tls and h2c:
        fail(f"{name}: Service port grpc: appProtocol kubernetes.io/h2c, but the port speaks TLS")
    if not tls and not h2c:
        fail(f"{name}: Service port grpc is cleartext HTTP/2 and should say so "
             "(appProtocol: kubernetes.io/h2c)")

    # The configuration itself, as `payroc-broker check-config` sees it, with
    # each api_key_file read from the example Secret.
    keys_dir = mounts[secret_volume]
    key_dir = os.path.join(scratch, name, "keys")
    shutil.rmtree(key_dir, ignore_errors=True)
    os.makedirs(key_dir)
    for key, value in secret.get("stringData", {}).items():
        path = os.path.join(key_dir, key)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(value)
    referenced = [c["api_key_file"] for c in config.get("credentials", []) if "api_key_file" in c]
    if not referenced:
        fail(f"{name}: broker.toml names no api_key_file")
    tls_files = {k: v for k, v in server.get("tls", {}).items() if k in ("cert_file", "key_file", "client_ca_file")}
    if tls and not {"cert_file", "key_file"} <= tls_files.keys():
        fail(f"{name}: [server.tls] without cert_file and key_file")
    for path in referenced + list(tls_files.values()) + sorted(probe_cas):
        if os.path.dirname(path) != keys_dir:
            fail(f"{name}: {path} is outside the Secret mount {keys_dir}")
        if os.path.basename(path) not in secret.get("stringData", {}):
            fail(f"{name}: {path}: the example Secret has no key {os.path.basename(path)}")
    if tls:
        # The example Secret holds placeholders: a CA and a certificate for
        # the probes' server name take their place, signed as a real one is.
        if shutil.which("openssl") is None:
            fail("openssl is needed to make a scratch certificate for [server.tls]")
        make_certificate(key_dir, server_name, tls_files["cert_file"], tls_files["key_file"],
                         sorted(probe_cas) + ([tls_files["client_ca_file"]] if "client_ca_file" in tls_files else []))
    local_toml = os.path.join(scratch, name, "broker.toml")
    with open(local_toml, "w", encoding="utf-8") as f:
        f.write(toml_text.replace(f'"{keys_dir}/', f'"{key_dir}/'))
    out = subprocess.run([broker, "check-config", "--config", local_toml], capture_output=True, text=True)
    print(f"{name}: {out.stdout.strip()}")
    if out.returncode != 0:
        fail(f"{name}: check-config refused the ConfigMap's broker.toml:\n{out.stderr}")
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    if not tls:
        # Without [server.tls] check-config warns that a cleartext port faces
        # the network unless a sidecar encrypts it, which in the mesh it does
        # (STRICT mTLS, checked in check_istio): that warning alone is expected.
        expected = [w for w in warnings if "make sure a mesh sidecar encrypts this port" in w]
        for w in expected:
            print(f"{name}: expected in the mesh: {w}")
        warnings = [w for w in warnings if w not in expected]
    if warnings:
        fail(f"{name}: check-config warns about the ConfigMap's broker.toml:\n" + "\n".join(warnings))
    return config, tls, client_ports, deployment, service


def check_plain(docs, deployment, tls, client_ports):
    """No mesh: the broker's own TLS, and a NetworkPolicy for the callers' ports."""
    if not tls:
        fail("plain: without a mesh the broker must terminate TLS ([server.tls])")
    (policy,) = [d for d in docs if d.get("kind") == "NetworkPolicy"] or [None]
    if policy is None or not pod_selected(policy["spec"]["podSelector"], deployment):
        fail("plain: no NetworkPolicy selects the broker's pods")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    for port in client_ports:
        if port not in allowed:
            fail(f"plain: the NetworkPolicy lets nobody reach port {port}")


def check_istio(docs, config, deployment, tls, client_ports):
    """In the mesh: the sidecar's mTLS and identity instead of the broker's."""
    server = config.get("server", {})
    if tls:
        fail("istio: [server.tls] is set; in the mesh the sidecar's mTLS encrypts, and the "
             "sidecar could not read the caller's certificate through the broker's TLS")
    if server.get("forwarded_identity") != "xfcc":
        fail('istio: server.forwarded_identity must be "xfcc" (the sidecar names the caller there)')
    for net in server.get("trusted_proxies", ["127.0.0.0/8", "::1/128"]):
        net = ipaddress.ip_network(net, strict=False)
        if not net.is_loopback:
            fail(f"istio: trusted_proxies {net} is not loopback: anyone there could claim any identity")
    if config.get("ext_authz", {}).get("enabled") is not True:
        fail("istio: [ext_authz] enabled = true is what mesh/'s egress gateway calls")
    for caller in config.get("callers", []):
        if "spiffe_id" not in caller:
            fail(f"istio: caller {caller.get('name')} is not named by spiffe_id: behind the sidecar "
                 "every token caller shares one peer address and its wrong-token throttle")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if labels.get("sidecar.istio.io/inject") != "true":
        fail('istio: the pod template lacks the label sidecar.istio.io/inject: "true"')

    peer = [d for d in docs if d["kind"] == "PeerAuthentication" and pod_selected(d["spec"]["selector"], deployment)]
    if len(peer) != 1 or peer[0]["spec"].get("mtls", {}).get("mode") != "STRICT":
        fail("istio: one PeerAuthentication with mtls.mode STRICT must select the broker's pods "
             "(the broker has no TLS of its own)")
    policies = [d for d in docs if d["kind"] == "AuthorizationPolicy"
                and pod_selected(d["spec"].get("selector", {}), deployment)]
    if len(policies) != 1 or policies[0]["spec"].get("action") != "ALLOW":
        fail("istio: one ALLOW AuthorizationPolicy must select the broker's pods")
    reachable = set()
    for rule in policies[0]["spec"].get("rules", []):
        principals = [p for f in rule.get("from", []) for p in f.get("source", {}).get("principals", [])]
        named_only = bool(rule.get("from")) and all(
            f.get("source", {}).keys() == {"principals"} for f in rule["from"]) \
            and principals and not any("*" in p for p in principals)
        for op in [t.get("operation", {}) for t in rule.get("to", [])] or [{}]:
            op_ports = {int(p) for p in op.get("ports", [])} or set(client_ports.values())
            reachable |= op_ports
            paths = op.get("paths", ["*"])
            if client_ports["grpc"] in op_ports and any(istio_path_matches(p, CHECK_PATH) for p in paths) \
                    and not named_only:
                fail("istio: the AuthorizationPolicy lets callers other than named principals (the "
                     "egress gateway) call ext_authz Check, whose source.principal the broker believes")
    for port, number in client_ports.items():
        if number not in reachable:
            fail(f"istio: the AuthorizationPolicy lets nobody reach port {port} ({number})")


def check_mesh(mesh_docs, mesh_config, listen_port, service):
    """mesh/: a CUSTOM policy whose provider meshConfig declares on the broker."""
    policy = [d for d in mesh_docs if d["kind"] == "AuthorizationPolicy"]
    if len(policy) != 1 or policy[0]["spec"].get("action") != "CUSTOM":
        fail("istio-mesh: expected one AuthorizationPolicy with action CUSTOM")
    provider = policy[0]["spec"]["provider"]["name"]
    (mesh,) = [d for d in mesh_config if d.get("kind") == "IstioOperator"] or [None]
    if mesh is None:
        fail("istio-mesh: mesh-config.yaml has no IstioOperator")
    providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    if provider not in providers or "envoyExtAuthzGrpc" not in providers[provider]:
        fail(f"istio-mesh: meshConfig.extensionProviders has no envoyExtAuthzGrpc provider {provider!r}")
    grpc = providers[provider]["envoyExtAuthzGrpc"]
    if grpc["port"] != listen_port:
        fail("istio-mesh: the extension provider does not point at the broker's port")
    if grpc["service"].split(".")[0] != service["metadata"]["name"]:
        fail(f"istio-mesh: the extension provider's service {grpc['service']} is not the broker's Service")
    if grpc.get("failOpen") is not False:
        fail("istio-mesh: the extension provider must say failOpen: false (no broker, no credentials)")
    if not any(d["kind"] == "ServiceEntry" and PAYROC_API_HOST in d["spec"]["hosts"] for d in mesh_docs):
        fail(f"istio-mesh: no ServiceEntry for {PAYROC_API_HOST}")


def check_envoy(docs, root, tls, listen_port):
    """Envoy egress: ext_authz calls the (plain) broker over HTTP/2, upstream TLS to Payroc."""
    (envoy,) = docs[f"{root}/envoy/egress.yaml"]
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


def check(broker, out_dir, root, scratch):
    """Every cross-check on the rendered overlays (see the module's docstring)."""
    docs = check_files(root)
    rendered = {}
    for name in OVERLAYS:
        path = os.path.join(out_dir, f"{name}.yaml")
        if not os.path.exists(path):
            fail(f"{path}: not rendered (run `check_deploy.py render` first)")
        rendered[name] = load_all(path)

    def secret_of(sub):
        (secret,) = load_all(os.path.join(root, "kubernetes", sub, "secret.example.yaml"))
        return secret

    _, plain_tls, plain_ports, plain_dep, _ = check_overlay(
        "plain", rendered["plain"], secret_of(OVERLAYS["plain"]), broker, scratch)
    check_plain(rendered["plain"], plain_dep, plain_tls, plain_ports)
    config, istio_tls, istio_ports, istio_dep, istio_svc = check_overlay(
        "istio", rendered["istio"], secret_of(OVERLAYS["istio"]), broker, scratch)
    check_istio(rendered["istio"], config, istio_dep, istio_tls, istio_ports)
    check_mesh(rendered["istio-mesh"],
               load_all(os.path.join(root, "kubernetes", OVERLAYS["istio-mesh"], "mesh-config.yaml")),
               istio_ports["grpc"], istio_svc)
    # The Envoy bootstrap stands in front of a broker without a mesh.
    check_envoy(docs, root, plain_tls, plain_ports["grpc"])
    print(f"{root}/: both overlays, the Envoy and Istio files agree with each other and the broker")


# Planted errors: (file under deploy/, text there, its replacement, the stage
# that must fail, a fragment of its message). Each is applied alone to a
# fresh copy of deploy/.
PLANTS = [
    ("kubernetes/overlays/plain/kustomization.yaml", "  - deployment-tls.yaml", "  - deployment-tsl.yaml",
     "render", "kubectl kustomize"),
    ("kubernetes/overlays/plain/deployment-tls.yaml", "periodSeconds: 2", "periodSecond: 2",
     "validate", "periodSecond"),
    ("kubernetes/base/poddisruptionbudget.yaml", "apiVersion: policy/v1", "apiVersion: policy/v2",
     "validate", "schema"),
    ("kubernetes/overlays/istio/secret.example.yaml", "type: Opaque", "type: Opaque\nimmutible: true",
     "validate", "immutible"),
    ("kubernetes/overlays/plain/broker.toml", 'refresh_before_expiry = "5m"', 'refresh_before_expiry = "soon"',
     "check", "check-config refused"),
    ("kubernetes/overlays/istio/broker.toml", 'terminals = ["1234001", "1234002"]\nrpcs = ["Authorize"]',
     'terminals = ["1234001"]\nrpcs = ["Authorize"]', "check", "check-config warns"),
    ("kubernetes/base/deployment.yaml", "mountPath: /etc/payroc-broker", "mountPath: /etc/payroc",
     "check", "is not in the ConfigMap mount"),
    ("kubernetes/overlays/plain/secret.example.yaml", "  ca.crt: replace-with-the-pem-ca-certificate\n", "",
     "check", "the example Secret has no key ca.crt"),
    ("kubernetes/overlays/plain/kustomization.yaml", "resources:\n  - networkpolicy.yaml\n", "",
     "check", "names it"),
    ("kubernetes/overlays/istio/broker.toml", 'listen = "0.0.0.0:50051"', 'listen = "0.0.0.0:50052"',
     "check", "do not match listen"),
    ("kubernetes/overlays/istio/broker.toml", 'forwarded_identity = "xfcc"', 'forwarded_identity = "none"',
     "check", "forwarded_identity"),
    ("kubernetes/overlays/istio/service-h2c.yaml", "      appProtocol: kubernetes.io/h2c\n", "",
     "check", "appProtocol: kubernetes.io/h2c"),
    ("kubernetes/overlays/istio/peer-authentication.yaml", "mode: STRICT", "mode: PERMISSIVE",
     "check", "STRICT"),
    ("kubernetes/overlays/istio/authorization-policy.yaml",
     'principals: ["cluster.local/ns/istio-system/sa/istio-egressgateway-service-account"]',
     'principals: ["*"]', "check", "call ext_authz Check"),
    ("kubernetes/overlays/istio/deployment-mesh.yaml", 'sidecar.istio.io/inject: "true"',
     'sidecar.istio.io/inject: "false"', "check", "sidecar.istio.io/inject"),
    ("kubernetes/overlays/istio/mesh/mesh-config.yaml", "port: 50051", "port: 50052",
     "check", "does not point at the broker's port"),
]


def self_test(kubectl, broker, scratch):
    """Each stage passes on an unchanged copy of deploy/ and fails on each
    planted error meant for it."""
    versions = ["1.30.0"]  # one is enough to see the check fail; CI runs both on the real files
    def stages(root):
        out = os.path.join(scratch, "rendered")
        shutil.rmtree(out, ignore_errors=True)
        for stage, run in (("render", lambda: render(kubectl, root, out)),
                           ("validate", lambda: validate(out, root, versions)),
                           ("check", lambda: check(broker, out, root, os.path.join(scratch, "check")))):
            try:
                run()
            except CheckFailed as e:
                return stage, str(e)
        return None, None

    def fresh_copy():
        root = os.path.join(scratch, "deploy")
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(DEPLOY, root)
        return root

    stage, msg = stages(fresh_copy())
    if stage is not None:
        fail(f"self-test: the unchanged deploy/ fails at {stage}: {msg}")
    for path, old, new, want_stage, want_msg in PLANTS:
        root = fresh_copy()
        target = os.path.join(root, path)
        with open(target, encoding="utf-8") as f:
            text = f.read()
        if text.count(old) != 1:
            fail(f"self-test: {path} no longer holds {old!r} exactly once: update PLANTS")
        with open(target, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
        stage, msg = stages(root)
        what = f"{path}: {old!r} -> {new!r}"
        if stage != want_stage or want_msg not in msg:
            fail(f"self-test: {what} should fail at {want_stage} with {want_msg!r}, "
                 f"got {stage or 'no failure'}: {msg}")
        print(f"self-test: {what} fails at {stage}: {' | '.join(msg.splitlines())[:300]}")
    print(f"self-test: {len(PLANTS)} planted errors each caught by its stage")


def main():
    usage = __doc__.split("\n\n")[1]
    args = sys.argv[1:]
    try:
        if args[:1] == ["render"] and len(args) == 3:
            render(args[1], DEPLOY, args[2])
        elif args[:1] == ["validate"] and len(args) >= 3:
            validate(args[1], DEPLOY, args[2:])
        elif args[:1] == ["check"] and len(args) == 4:
            scratch = os.path.abspath(args[3])
            os.makedirs(scratch, exist_ok=True)
            check(args[1], args[2], DEPLOY, scratch)
            check_dependency_layer(scratch)
        elif args[:1] == ["self-test"] and len(args) == 4:
            scratch = os.path.abspath(args[3])
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
            self_test(args[1], os.path.abspath(args[2]), scratch)
        else:
            sys.exit(f"usage:\n{usage}")
    except CheckFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
