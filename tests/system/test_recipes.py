"""The multi-machine recipes of docs/operations.md, run as written where this machine can.

Network namespaces stand in for machines (as in test_launch_multi.py): two, joined by a
veth pair, 10.77.0.1 and 10.77.0.2, each with its own ports, so the recipes' fixed ports
(29650 coordinator, 29651 torch.distributed, 29652 node servers) are free in them. Each
namespace also gets an /etc/hosts of its own (`ip netns exec` mounts /etc/netns/NAME/hosts
over /etc/hosts for what it runs; this machine's /etc/hosts is never touched), naming
the addresses as the recipes do: node01 and node02 (SLURM's node list, the ssh hosts file)
and adapm-0.adapm, adapm-1.adapm (the Kubernetes pods). What stands in for srun, ssh and
the kubelet is a small script each, described where it is made; the recipes' commands are
read from the example files (and docs/operations.md for ssh) and run unchanged.

Without root or `ip netns` those runs are skipped; the host-list parser's tests, the
launcher's environment sources and the example files' checks run everywhere."""
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import pytest
from testpaths import ROOT

from adapm.common.hostlist import expand, first_host, iter_hosts, parse
from adapm.ops.placement import DEFAULT_COORDINATOR_PORT, environ_coordinator, machine_placement

from conftest import SESSION_TAG, wait_until_clean

pytestmark = pytest.mark.timeout(180)

SBATCH = ROOT / "examples" / "slurm" / "adapm.sbatch"
MANIFEST = ROOT / "examples" / "kubernetes" / "adapm-job.yaml"
HOSTS_FILE = ROOT / "examples" / "ssh" / "hosts"
OPERATIONS = ROOT / "docs" / "operations.md"
BIN = Path(sys.executable).parent  # adapm-launch, as `pip install` made it
LAUNCHER = str(BIN / "adapm-launch")
RUN_TIMEOUT = 120


# -- the host-list parser -------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("node[8-10]", ["node8", "node9", "node10"]),             # no padding: widths grow
    ("node[08-10]", ["node08", "node09", "node10"]),          # padding of LOW kept
    ("n[001-002]", ["n001", "n002"]),
    ("n[1-2,005]", ["n1", "n2", "n005"]),                    # each range its own width
    ("n[7]", ["n7"]),
    ("n[3,1]", ["n3", "n1"]),                                # order as written
    ("n[5-5]", ["n5"]),
    ("10.77.0.[1-2]", ["10.77.0.1", "10.77.0.2"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("[1-2]x", ["1x", "2x"]),                                # a group first
    ("a[1-2]b[3]c,d[9-10]e", ["a1b3c", "a2b3c", "d9e", "d10e"]),
    ("node-[1-2].cluster.example", ["node-1.cluster.example", "node-2.cluster.example"]),
    ("  node[1-2]\n", ["node1", "node2"]),                   # around the list: ignored
])
def test_hostlist_expands(text, hosts):
    assert expand(text) == hosts
    assert first_host(text) == hosts[0]
    assert list(iter_hosts(text)) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty host list"),
    ("   ", "empty host list"),
    ("node[1-2", "at character 5: '[' without ']'"),
    ("node1]", "at character 6: ']' without '['"),
    ("a,,b", "at character 3: empty host name"),
    (",a", "at character 1: empty host name"),
    ("a,", "at the end: empty host name"),
    ("a[]", "empty range"),
    ("a[1,]", "empty range"),
    ("a[,1]", "empty range"),
    ("a[3-1]", "range '3-1' runs backwards"),
    ("a[x-2]", "'x-2' in '[...]': expected NUMBER or LOW-HIGH"),
    ("a[1-b]", "expected NUMBER or LOW-HIGH"),
    ("a[1-2-3]", "expected NUMBER or LOW-HIGH"),
    ("a[-1]", "expected NUMBER or LOW-HIGH"),
    ("a[1-]", "expected NUMBER or LOW-HIGH"),
    ("a[1-4:2]", "expected NUMBER or LOW-HIGH"),             # no strides in SLURM lists
    ("a[ 1]", "expected NUMBER or LOW-HIGH"),
    ("a[\u0661]", "expected NUMBER or LOW-HIGH"),            # digits, but not ASCII ones
    ("a[[1]]", "at character 3: nested '['"),
    ("a[1[2]]", "nested '['"),
    ("node 1", "at character 5: ' ' in a host name"),
    ("a,\tb", "'\\t' in a host name"),
])
def test_malformed_hostlist_is_an_error_naming_the_place(text, message):
    with pytest.raises(ValueError, match="empty host list" if not text.strip() else
                       re.escape(f"malformed host list {text!r}")) as error:
        expand(text)
    assert message in str(error.value)
    with pytest.raises(ValueError):
        first_host(text)  # the whole list is checked, not only its first host


def test_hostlist_errors_count_from_the_start_of_the_text():
    with pytest.raises(ValueError, match=r"at character 4: '\[' without"):
        parse("  n[1")


def test_hostlist_is_expanded_lazily():
    assert first_host("node[0000000-9999999],x") == "node0000000"
    hosts = iter_hosts("a[1-3],b[999999999999-999999999999]")
    assert [next(hosts) for _ in range(4)] == ["a1", "a2", "a3", "b999999999999"]


def test_hostlist_is_a_str():
    with pytest.raises(TypeError):
        parse(b"node1")


# -- where adapm-launch finds the coordinator and its node rank -----------------------

@pytest.mark.parametrize("environ, coordinator", [
    ({}, None),
    ({"SLURM_JOB_NODELIST": "node[01-03,07],gpu5"}, f"node01:{DEFAULT_COORDINATOR_PORT}"),
    ({"SLURM_JOB_NODELIST": "10.77.0.[1-2]"}, "10.77.0.1:29650"),
    # the srun step's list (whose node 0 SLURM_NODEID counts from) before the job's
    ({"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_STEP_NODELIST": "n[3-4]"}, "n3:29650"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "m", "MASTER_PORT": "7"}, "m:7"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "m"}, "m:"),   # port 29650 later
    ({"SLURM_JOB_NODELIST": "n[1-2]", "ADAPM_COORDINATOR": "c:5", "MASTER_ADDR": "m"},
     "c:5"),
    ({"SLURM_JOB_NODELIST": ""}, None),
])
def test_coordinator_from_the_environment(environ, coordinator):
    assert environ_coordinator(environ) == coordinator


def test_malformed_nodelist_is_a_usage_error_naming_the_variable():
    with pytest.raises(click.UsageError, match=r"SLURM_JOB_NODELIST: malformed host list"):
        environ_coordinator({"SLURM_JOB_NODELIST": "node[1-"})


@pytest.mark.parametrize("environ, placement", [
    ({"ADAPM_NNODES": "3", "JOB_COMPLETION_INDEX": "2"}, (3, 2)),
    ({"JOB_COMPLETION_INDEX": "0"}, (None, 0)),
    # an Indexed Job's index is the last source: any other node rank wins
    ({"NODE_RANK": "1", "JOB_COMPLETION_INDEX": "0"}, (None, 1)),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "1"}, (2, 1)),
])
def test_node_rank_sources(environ, placement):
    assert machine_placement(environ) == placement


def test_job_completion_index_must_be_a_number():
    with pytest.raises(click.UsageError, match="JOB_COMPLETION_INDEX='x' is not a number"):
        machine_placement({"JOB_COMPLETION_INDEX": "x"})


def clean_environ(**extra):
    """The environment of a fresh machine's process: nothing of this one's placement
    variables (a SLURM_*, MASTER_ADDR or WORLD_SIZE of the test's own environment must not
    count), this session's cluster tag (tests/conftest.py), and `extra`."""
    environ = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get(
        "HOME", "/root"), "LANG": "C.UTF-8", "ADAPM_CLUSTER_TAG": SESSION_TAG}
    environ.update(extra)
    return environ


def run_launcher(args, environ, timeout=60):
    return subprocess.run([LAUNCHER, *args], env=clean_environ(**environ), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def test_launcher_takes_the_coordinator_from_the_slurm_node_list():
    """Without a network: the launcher gets as far as checking --dist-port against the
    coordinator's port, which it derived from SLURM_JOB_NODELIST (the port 29650)."""
    done = run_launcher(["--num-keys", "4", "--dist-port", "29650", "x.py"],
                        {"SLURM_JOB_NODELIST": "127.0.0.[1-3]", "SLURM_NNODES": "3",
                         "SLURM_NODEID": "1"})
    assert done.returncode == 2, done.stdout
    assert "--dist-port 29650 is the coordinator's port" in done.stdout


def test_launcher_reports_a_malformed_slurm_node_list():
    done = run_launcher(["--num-keys", "4", "x.py"],
                        {"SLURM_JOB_NODELIST": "node[01-", "SLURM_NNODES": "2",
                         "SLURM_NODEID": "0"})
    assert done.returncode == 2, done.stdout
    assert "SLURM_JOB_NODELIST: malformed host list 'node[01-'" in done.stdout


def test_launcher_takes_the_node_rank_from_job_completion_index():
    done = run_launcher(["--num-keys", "4", "x.py"],
                        {"JOB_COMPLETION_INDEX": "5", "ADAPM_NNODES": "2",
                         "ADAPM_COORDINATOR": "127.0.0.1:29650"})
    assert done.returncode == 2, done.stdout
    assert "--node-rank 5 outside 0..1" in done.stdout


# -- the example files -------------------------------------------------------------------

def load_manifest(text):
    """The documents of a YAML file in the block style of examples/kubernetes: mappings,
    sequences, plain and quoted scalars, literal blocks (`|`), comments. PyYAML is not a
    dependency; where it is installed, test_manifest_reader_agrees_with_pyyaml checks that
    both read the manifest alike. Anything else is an error, not a guess."""
    documents, lines = [], []
    for line in text.splitlines() + ["---"]:
        if line.rstrip() == "---":
            if any(_content(raw) for raw in lines):
                documents.append(_Block(lines).node(0))
            lines = []
        else:
            lines.append(line)
    return documents


def _content(line):
    stripped = line.strip()
    return "" if stripped.startswith("#") else stripped


def _indent(line):
    return len(line) - len(line.lstrip(" "))


class _Block:
    def __init__(self, lines):
        self.lines, self.at = list(lines), 0

    def peek(self):
        """(indent, content) of the next line with content, or None."""
        while self.at < len(self.lines) and not _content(self.lines[self.at]):
            self.at += 1
        if self.at == len(self.lines):
            return None
        line = self.lines[self.at]
        if "\t" in line[:_indent(line) + 1]:
            raise ValueError(f"a tab in the indentation: {line!r}")
        return _indent(line), line.strip()

    def node(self, indent):
        indent, content = self.peek()
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent):
        result = {}
        while (line := self.peek()) and line[0] == indent and not line[1].startswith("- "):
            key, sep, rest = line[1].partition(":")
            if not sep or (rest and not rest.startswith(" ")):
                raise ValueError(f"not a `key: value` line: {line[1]!r}")
            if key in result:
                raise ValueError(f"{key!r} twice")
            self.at += 1
            result[key] = self.value(rest.strip(), indent)
        if line and line[0] > indent:
            raise ValueError(f"unexpected indentation: {self.lines[self.at]!r}")
        return result

    def sequence(self, indent):
        result = []
        while (line := self.peek()) and line[0] == indent and (
                line[1] == "-" or line[1].startswith("- ")):
            item = line[1][1:].strip()
            if re.match(r"[^\"'|{\[][^:]*:( |$)", item):
                # `- key: value`: a mapping, whose first line this is, indented past `- `
                self.lines[self.at] = " " * (indent + 2) + item
                result.append(self.mapping(indent + 2))
            else:
                self.at += 1
                result.append(self.value(item, indent))
        return result

    def value(self, text, indent):
        text = _strip_comment(text)
        if text == "|":
            return self.literal(indent)
        if text:
            return _scalar(text)
        line = self.peek()
        if line and (line[0] > indent or (line[0] == indent and line[1].startswith("- "))):
            return self.node(line[0])
        return None

    def literal(self, indent):
        """A `|` block: the lines indented past `indent`, kept as they are but for the
        block's indentation; one newline at its end."""
        block = []
        while self.at < len(self.lines) and (
                not self.lines[self.at].strip() or _indent(self.lines[self.at]) > indent):
            block.append(self.lines[self.at])
            self.at += 1
        while block and not block[-1].strip():
            self.lines.insert(self.at, block.pop())  # blank lines after: not the block's
        if not block:
            return ""
        width = _indent(block[0])
        if any(line.strip() and _indent(line) < width for line in block):
            raise ValueError("a literal block's first line is indented past the others")
        return "\n".join(line[width:] for line in block) + "\n"


def _strip_comment(text):
    if text and text[0] in "\"'":
        end = text.find(text[0], 1)
        while text[0] == "'" and end >= 0 and text[end + 1:end + 2] == "'":
            end = text.find("'", end + 2)
        if end < 0:
            raise ValueError(f"an unclosed quote: {text!r}")
        rest = text[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ValueError(f"text after a quoted scalar: {text!r}")
        return text[:end + 1]
    return re.split(r"\s#", text, maxsplit=1)[0].strip()


def _scalar(text):
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text[0] in "{[&*!|>%@`":
        raise ValueError(f"not in the block style this reader knows: {text!r}")
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def test_manifest_reader():
    text = ("# top\na: 1\nb:\n  - x\n  - 'it''s'  # c\n  - name: n\n    value: \"2\"\n"
            "c: |\n  one\n\n    two # kept\nd: plain text\ne:\n- f\n---\n---\ng: true\n")
    assert load_manifest(text) == [
        {"a": 1, "b": ["x", "it's", {"name": "n", "value": "2"}],
         "c": "one\n\n  two # kept\n", "d": "plain text", "e": ["f"]},
        {"g": True}]
    for bad in ["a: {b: 1}\n", "a: [1]\n", "a\n", "a: 1\na: 2\n", "a: 'x\n",
                "a:\n  b: 1\n    c: 2\n"]:
        with pytest.raises(ValueError):
            load_manifest(bad)


def test_manifest_reader_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml")
    text = MANIFEST.read_text()
    assert load_manifest(text) == [doc for doc in yaml.safe_load_all(text) if doc]


class Manifest:
    """What the Kubernetes example says, checked for what makes it work."""

    def __init__(self):
        docs = {doc["kind"]: doc for doc in load_manifest(MANIFEST.read_text())}
        assert sorted(docs) == ["Job", "Service"], docs
        service, job = docs["Service"], docs["Job"]
        self.service, self.job = service["metadata"]["name"], job["metadata"]["name"]
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        [container] = pod["containers"]
        self.env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
        # the cluster secret comes from a Secret, the same for every pod
        [secret] = [item for item in container["env"] if "value" not in item]
        assert secret["name"] == "ADAPM_CLUSTER_SECRET", secret
        assert set(secret["valueFrom"]["secretKeyRef"]) == {"name", "key"}, secret
        # every pod gets the DNS name <job>-<index>.<service> from the headless Service
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"] == {"job-name": self.job}
        assert pod["subdomain"] == self.service
        assert spec["completionMode"] == "Indexed"
        self.nodes = int(self.env["ADAPM_NNODES"])
        assert spec["completions"] == spec["parallelism"] == self.nodes
        assert "ADAPM_NODE_RANK" not in self.env  # each pod's own: JOB_COMPLETION_INDEX
        assert self.env["ADAPM_COORDINATOR"] == \
            f"{self.job}-0.{self.service}:{DEFAULT_COORDINATOR_PORT}"
        assert container["command"][:2] == ["sh", "-c"] and len(container["command"]) == 3
        self.script = container["command"][2]
        [launch] = [line for line in self.script.splitlines() if "adapm-launch" in line]
        args = shlex.split(launch)
        self.node_port = int(args[args.index("--port") + 1])
        # the ports pods reach each other on: declared on the Service and the container
        ports = {DEFAULT_COORDINATOR_PORT, DEFAULT_COORDINATOR_PORT + 1, self.node_port}
        assert {p["port"] for p in service["spec"]["ports"]} == ports
        assert {p["containerPort"] for p in container["ports"]} == ports
        # the table lives in /dev/shm, 64 MiB in a container unless a volume says more
        [shm] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        [volume] = [v for v in pod["volumes"] if v["name"] == shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"

    def pod_name(self, index):
        return f"{self.job}-{index}.{self.service}"


def test_kubernetes_manifest_is_consistent():
    manifest = Manifest()
    assert manifest.nodes == 2 and manifest.node_port not in (29650, 29651)


def sbatch_launch_line():
    """The srun line of the sbatch script, continuation lines joined."""
    text = SBATCH.read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.strip().startswith("srun ")]
    return shlex.split(line)


def test_sbatch_script_runs_one_launcher_per_node():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in directives
    args = sbatch_launch_line()
    assert "--ntasks-per-node=1" in args and "adapm-launch" in args
    assert "--coordinator" not in args  # SLURM_JOB_NODELIST's first host
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def ssh_command_lines():
    """The `adapm-launch --hosts examples/ssh/hosts` command of docs/operations.md."""
    text = OPERATIONS.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()
             if line.strip().startswith("adapm-launch --hosts examples/ssh/hosts")]
    assert lines, "docs/operations.md shows no `adapm-launch --hosts examples/ssh/hosts`"
    return [shlex.split(line) for line in lines]


def test_hosts_file_names_hosts():
    hosts = [line.split("#")[0].strip() for line in HOSTS_FILE.read_text().splitlines()]
    assert [h for h in hosts if h] == ["node01", "node02"]


# -- the recipes, in network namespaces --------------------------------------------------

HOST_NAMES = [["node01", "adapm-0.adapm"], ["node02", "adapm-1.adapm"]]


@pytest.fixture
def machines():
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2, each
    resolving HOST_NAMES through an /etc/hosts of its own: [(namespace, address)]."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = uuid.uuid4().hex[:6]
    names = [f"adapm-r{tag}{i}" for i in range(2)]
    veth = [f"vr{tag}{i}" for i in range(2)]
    addresses = ["10.77.0.1", "10.77.0.2"]
    made_etc = not os.path.isdir("/etc/netns")

    def ip(*args, ns=None):
        cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
        subprocess.run(cmd, check=True, capture_output=True)

    def remove():
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        if made_etc:
            try:
                os.rmdir("/etc/netns")  # only if empty: another run's may be in it
            except OSError:
                pass

    try:
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{address} {' '.join(host)}\n" for address, host in zip(addresses, HOST_NAMES))
        for name in names:
            os.makedirs(f"/etc/netns/{name}")
            Path(f"/etc/netns/{name}/hosts").write_text(hosts)
            ip("netns", "add", name)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for name, dev, address in zip(names, veth, addresses):
            ip("link", "set", dev, "netns", name)
            ip("addr", "add", f"{address}/24", "dev", dev, ns=name)
            ip("link", "set", dev, "up", ns=name)
            ip("link", "set", "lo", "up", ns=name)
        probe = subprocess.run(["ip", "netns", "exec", names[1], "getent", "hosts", "node01"],
                               capture_output=True, text=True)
        if addresses[0] not in probe.stdout:
            raise OSError(f"/etc/netns/NAME/hosts is not used here: {probe.stdout!r}")
    except (OSError, subprocess.CalledProcessError) as exc:
        remove()
        detail = exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) \
            else str(exc)
        pytest.skip(f"cannot make network namespaces with host names here: {detail}")
    yield list(zip(names, addresses))
    remove()


def fake_command(directory, name, text):
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def run_all(commands, tmp_path, timeout=RUN_TIMEOUT):
    """Run every (argv, environment) at once, from the repository's root; [(exit code,
    output)] when all ended. Past `timeout` seconds, those still running get SIGTERM (the
    launcher then stops its cluster), SIGKILL 20 s later, and the test fails with every
    output. Each command leads a process group of its own, which the signals go to."""
    procs, outputs = [], []
    for number, (argv, environ) in enumerate(commands):
        outputs.append(tmp_path / f"output{number}")
        with open(outputs[-1], "w") as out:
            procs.append(subprocess.Popen(argv, env=environ, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    late = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            late.append(proc)
    for proc in late:  # each leads a process group of its own: srun's tasks too
        os.killpg(proc.pid, signal.SIGTERM)
    for proc in late:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    texts = [path.read_text() for path in outputs]
    assert not late, f"still running after {timeout} s:\n" + "\n----\n".join(texts)
    return [(proc.returncode, text) for proc, text in zip(procs, texts)]


def assert_clean():
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes, (segments, processes)


def assert_mf_trained(out):
    """The mf example app trained: worker 0's report. (That both nodes took part, each
    launcher's exit code 0 says: a per-machine launcher ends well only once the cluster of
    --nnodes nodes formed and every node's workers finished.)"""
    assert re.search(r"\[n0 w0\] \[mf\] done in .*test RMSE [\d.]+ untrained -> "
                     r"[\d.]+ trained", out), out
    assert "Traceback" not in out, out
    assert "WARNING: no cluster secret" not in out, out  # every recipe sets one


def test_slurm_recipe(tmp_path, machines):
    """sbatch's script as written, with an srun that runs its command once in each
    namespace with the variables srun gives a task of a 2-node job step."""
    nodelist = "node[01-02]"
    assert expand(nodelist) == [host[0] for host in HOST_NAMES]
    names = [name for name, _ in machines]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "srun", f"""#!{sys.executable}
# srun as a job step of one task per node would run it: the options up to the command
# (only the forms the sbatch script uses), then the command in every node's namespace.
import os, subprocess, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
assert "--ntasks-per-node=1" in options, options
assert all("=" in option for option in options), options
namespaces = {names!r}
hosts = {expand(nodelist)!r}
assert os.environ["SLURM_JOB_NODELIST"] == {nodelist!r}
procs = []
for node, (namespace, host) in enumerate(zip(namespaces, hosts)):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0",
               SLURM_NTASKS=str(len(hosts)), SLURM_NPROCS=str(len(hosts)),
               SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_STEP_NODELIST={nodelist!r},
               SLURM_NODELIST={nodelist!r}, SLURM_STEP_NUM_NODES=str(len(hosts)),
               SLURM_STEP_NUM_TASKS=str(len(hosts)), SLURMD_NODENAME=host,
               SLURM_TOPOLOGY_ADDR=host)
    procs.append(subprocess.Popen(["ip", "netns", "exec", namespace, *args], env=env))
codes = [proc.wait() for proc in procs]
sys.exit(next((code for code in codes if code), 0))
""")
    environ = clean_environ(
        PATH=f"{bin_dir}:{BIN}:/usr/local/bin:/usr/bin:/bin",
        SLURM_JOB_ID="4242", SLURM_JOBID="4242", SLURM_JOB_NAME="adapm",
        SLURM_JOB_NODELIST=nodelist, SLURM_NODELIST=nodelist, SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2", SLURM_CPUS_PER_TASK="2", SLURM_NODEID="0",
        SLURM_SUBMIT_DIR=str(ROOT))
    [(code, out)] = run_all([(["bash", str(SBATCH)], environ)], tmp_path)
    assert code == 0, out
    assert_mf_trained(out)
    assert_clean()


def test_kubernetes_recipe(tmp_path, machines):
    """Each pod's command and environment from the manifest, run in a namespace with the
    JOB_COMPLETION_INDEX the Job controller sets; the pods' DNS names (adapm-0.adapm) are
    the namespaces' /etc/hosts entries. Pod 1 starts first, as it may."""
    manifest = Manifest()
    assert manifest.nodes == len(machines)
    secret = secrets.token_hex(32)  # what the Secret adapm-cluster-secret holds
    procs = {}
    for index in reversed(range(manifest.nodes)):
        namespace = machines[index][0]
        environ = clean_environ(**manifest.env, JOB_COMPLETION_INDEX=str(index),
                                HOSTNAME=f"{manifest.job}-{index}",
                                ADAPM_CLUSTER_SECRET=secret)
        procs[index] = (["ip", "netns", "exec", namespace, "sh", "-c", manifest.script],
                        environ)
    results = dict(zip(procs, run_all(list(procs.values()), tmp_path)))
    outs = {index: out for index, (_, out) in results.items()}
    for index, (code, out) in results.items():
        assert code == 0, f"pod {index}:\n{out}\nthe other:\n{outs[1 - index]}"
    assert_mf_trained(outs[0])
    assert "Traceback" not in outs[1], outs[1]
    assert_clean()


def test_ssh_recipe(tmp_path, machines):
    """docs/operations.md's command with examples/ssh/hosts as written, with an ssh that
    runs the command in the host's namespace (as a remote login shell would, with
    adapm-launch on its PATH)."""
    [args] = ssh_command_lines()
    hosts = {host[0]: name for host, (name, _) in zip(HOST_NAMES, machines)}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "".join(f'    {host}) ns={name} ;;\n' for host, name in hosts.items())
    fake_command(bin_dir, "ssh", f"""#!/bin/sh
# ssh HOST COMMAND: the command in the namespace standing in for HOST, in a shell
host="$1"; shift
case "$host" in
{cases}    *) echo "ssh: unknown host $host" >&2; exit 255 ;;
esac
cd "$HOME" || exit 1
exec ip netns exec "$ns" sh -c "$*"
""")
    environ = clean_environ(PATH=f"{bin_dir}:{BIN}:/usr/local/bin:/usr/bin:/bin",
                            HOME=str(tmp_path))
    [(code, out)] = run_all([(args, environ)], tmp_path)
    assert code == 0, out
    assert_mf_trained(out)
    assert "[node01] [n0 w0] [mf] done" in out, out
    assert_clean()
