"""--secure: CURVE keys per cluster; a process without them can neither join nor inject,
and the keys reach only the processes that need them."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq
from testpaths import TESTS

import adapm
from adapm.ops.cluster import LocalCluster
from adapm.ops.launch import main as launch_main
from adapm.ops.launch_hosts import remote_command
from adapm.wire.protocol import Message, MsgType, worker_identity
from adapm.wire.security import ENV_CURVE_CLIENT, ENV_CURVE_KEYS, CurveKeys
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(90)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
SCRIPT = str(TESTS / "launch_script.py")
SECRET_SCRIPT = str(TESTS / "secret_script.py")
CHILD_ENVIRON = "import json, os; print(json.dumps(dict(os.environ)))"


def sums(w):
    w.push(np.arange(w.num_keys), np.ones((w.num_keys, 2)))
    w.wait_sync()
    w.barrier()
    return float(w.pull(np.arange(w.num_keys)).sum())


def test_secure_run_works():
    assert adapm.run(sums, nodes=2, num_keys=10, value_length=2, secure=True) == [40.0, 40.0]


def test_secure_launch_works(tmp_path):
    proc = subprocess.run([LAUNCHER, "--secure", "--nodes", "2", "--workers-per-node", "1",
                           "--num-keys", "30", "--value-length", "2", SCRIPT, "sums",
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("total 300") == 2


def _outsider_gets_answer(address, keys=None, token=0):
    """Send a well-formed HELLO as worker 5 would; True if any answer comes back."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, worker_identity(5, token))
        if keys is not None:
            keys.connect(sock)
        sock.connect(address)
        sock.send_multipart(Message(MsgType.HELLO, src_worker=5, token=token).encode())
        return bool(sock.poll(1500))
    finally:
        ctx.destroy(linger=0)


def test_outsiders_are_rejected(monkeypatch):
    keys = CurveKeys.generate()
    spec = ClusterSpec(num_keys=8, value_length=2, num_nodes=1, workers_per_node=6,
                       curve=keys)
    with LocalCluster(spec) as cluster:
        address = cluster.addresses[0]
        assert not _outsider_gets_answer(address)                     # no CURVE at all
        stranger = CurveKeys(keys.server_public, keys.server_secret,
                             *zmq.curve_keypair())
        assert not _outsider_gets_answer(address, stranger)           # wrong client key
        assert not _outsider_gets_answer(address, keys)  # the cluster's keys, no token
        token = cluster.tables[0].view.cluster_token
        assert _outsider_gets_answer(address, keys, token)     # keys and the cluster's token
        for name, value in cluster.worker_environ(0).items():
            monkeypatch.setenv(name, value)
        w = adapm.Worker(cluster.worker_env(0))
        try:
            w.push([1], [[1.0, 2.0]])
            assert w.pull([1]).tolist() == [[1.0, 2.0]]
            # only the HELLO without the token reached the node (and was dropped); the
            # connections without the cluster's CURVE keys never completed
            assert w.stats()["node"]["malformed_messages"] == 1
        finally:
            w.finalize()


def test_keys_file_round_trip(tmp_path):
    keys = CurveKeys.generate()
    path = tmp_path / "keys"
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert CurveKeys.load(path) == keys
    with pytest.raises(ValueError):
        CurveKeys.from_text("not,keys")


# -- key files ---------------------------------------------------------------------


def test_keys_file_over_a_readable_file_ends_up_private(tmp_path):
    path = tmp_path / "keys"
    path.write_text("old\n")
    path.chmod(0o644)
    keys = CurveKeys.generate()
    keys.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert CurveKeys.load(path) == keys


@pytest.mark.parametrize("target_exists", [True, False])
def test_keys_file_replaces_a_symlink_instead_of_writing_through_it(tmp_path, target_exists):
    target = tmp_path / "elsewhere"
    if target_exists:
        target.write_text("untouched\n")
        target.chmod(0o644)
    link = tmp_path / "keys"
    link.symlink_to(target)
    keys = CurveKeys.generate()
    keys.save(link)
    assert not link.is_symlink()
    assert link.stat().st_mode & 0o777 == 0o600
    assert CurveKeys.load(link) == keys
    if target_exists:
        assert target.read_text() == "untouched\n"
    else:
        assert not target.exists()


def test_secret_keys_are_not_in_reprs():
    keys = CurveKeys.generate()
    spec = ClusterSpec(num_keys=4, curve=keys)
    for text in (repr(keys), repr(spec)):
        assert keys.server_secret.decode() not in text
        assert keys.client_secret.decode() not in text


# -- what each process gets ----------------------------------------------------------


def _secrets(keys):
    return keys.server_secret.decode(), keys.client_secret.decode()


def _holds(environ, secret):
    return any(secret in value for value in environ.values())


def _child_environ():
    out = subprocess.run([sys.executable, "-c", CHILD_ENVIRON], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return json.loads(out)


def test_worker_gets_client_keys_only_and_passes_none_on(monkeypatch):
    keys = CurveKeys.generate()
    server_secret, client_secret = _secrets(keys)
    spec = ClusterSpec(num_keys=4, num_nodes=1, curve=keys)
    with LocalCluster(spec) as cluster:
        environ = cluster.worker_environ(0)
        assert not _holds(environ, server_secret)
        assert environ[ENV_CURVE_CLIENT] == keys.client_text()
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        w = adapm.worker()
        try:
            w.push([1], [[2.0]])
            assert w.pull([1]).tolist() == [[2.0]]
            assert ENV_CURVE_CLIENT not in os.environ
            assert not _holds(os.environ, client_secret)
            assert not _holds(_child_environ(), client_secret)
        finally:
            w.finalize()


def _environment_seen(w):
    return {"script": dict(os.environ), "child": _child_environ()}


def test_run_workers_pass_no_secret_on():
    for seen in adapm.run(_environment_seen, nodes=2, num_keys=4, secure=True):
        for environ in seen.values():
            assert not [name for name in environ if name.startswith("ADAPM_CURVE")]


@pytest.mark.parametrize("how", ["keys-file", "environment"])
def test_launched_workers_get_no_server_secret_and_pass_none_on(tmp_path, how):
    keys = CurveKeys.generate()
    server_secret, client_secret = _secrets(keys)
    env = dict(os.environ)
    if how == "keys-file":
        keys.save(tmp_path / "keys")
        secure = ["--keys-file", str(tmp_path / "keys")]
    else:
        env[ENV_CURVE_KEYS] = keys.to_text()
        secure = ["--secure"]
    proc = subprocess.run([LAUNCHER, *secure, "--nodes", "2", "--num-keys", "4",
                           SECRET_SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(2):
        seen = json.loads((tmp_path / f"seen{rank}.json").read_text())
        assert seen["pulled"] == 2.0
        assert server_secret not in seen["given"]
        for name in ("script", "child", "script_with_worker", "child_with_worker"):
            assert not _holds(seen[name], server_secret), name
            assert not _holds(seen[name], client_secret), name


# -- --hosts ---------------------------------------------------------------------------


def _hosts_context(tmp_path, *options):
    hosts = tmp_path / "hosts"
    hosts.write_text("alpha\nbeta\n")
    return launch_main.make_context("adapm-launch", [
        "--hosts", str(hosts), *options, "--num-keys", "10", "--mode", "static",
        "train.py", "--epochs", "3"])


def _parse_remote(command):
    """The options a remote adapm-launch sees in `command` (argv, launcher first)."""
    assert command[0] == "adapm-launch"
    return launch_main.make_context("adapm-launch", list(command[1:])).params


def test_hosts_command_passes_secure_as_a_bare_flag(tmp_path):
    CurveKeys.generate().save(tmp_path / "keys")
    ctx = _hosts_context(tmp_path, "--secure", "--keys-file", str(tmp_path / "keys"))
    command = remote_command(ctx, "adapm-launch", 2, 1, "alpha:29650",
                             ["train.py", "--epochs", "3"])
    assert "True" not in command
    params = _parse_remote(command)
    assert params["secure"] is True
    assert params["keys_file"] == str(tmp_path / "keys")
    assert (params["nnodes"], params["node_rank"], params["coordinator"]) == (2, 1,
                                                                              "alpha:29650")
    assert (params["num_keys"], params["mode"]) == (10, "static")
    assert params["script_and_args"] == ("train.py", "--epochs", "3")


def test_hosts_command_names_the_keys_file_by_its_absolute_path(tmp_path, monkeypatch):
    CurveKeys.generate().save(tmp_path / "keys")
    monkeypatch.chdir(tmp_path)
    ctx = _hosts_context(tmp_path, "--keys-file", "keys")
    params = _parse_remote(remote_command(ctx, "adapm-launch", 2, 0, "alpha:29650",
                                          ["train.py"]))
    assert params["keys_file"] == str(tmp_path / "keys")


def test_hosts_secure_keys_file_reaches_every_host(tmp_path):
    """The whole launcher with a stand-in for ssh that records each remote command."""
    keys = CurveKeys.generate()
    keys.save(tmp_path / "keys")
    log = tmp_path / "commands"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f'#!/bin/sh\nprintf "%s %s\\n" "$1" "$2" >> "{log}"\n')
    fake_ssh.chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("alpha\nbeta\n")
    proc = subprocess.run([LAUNCHER, "--hosts", str(hosts), "--ssh-command", str(fake_ssh),
                           "--secure", "--keys-file", str(tmp_path / "keys"),
                           "--num-keys", "10", "train.py", "--epochs", "3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(log.read_text().splitlines())
    assert [line.split(" ", 1)[0] for line in lines] == ["alpha", "beta"]
    for rank, line in enumerate(lines):
        command = shlex.split(line.split(" ", 1)[1])
        assert keys.server_secret.decode() not in line
        params = _parse_remote(command)
        assert params["secure"] is True and params["node_rank"] == rank
        assert params["keys_file"] == str(tmp_path / "keys")
        assert params["script_and_args"] == ("train.py", "--epochs", "3")


# -- keys given to the launcher (issue 17, point 7) ----------------------------------

def _launch(*args, env=None, timeout=30):
    environ = dict(os.environ, **(env or {}))
    proc = subprocess.run([LAUNCHER, *args], capture_output=True,
                          text=True, env=environ, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


NOT_Z85 = ",".join(["~" * 40] * 4)  # 40 characters each, but "~" is not a Z85 digit


@pytest.mark.parametrize("text", ["garbage", "a,b,c,d", NOT_Z85])
def test_malformed_curve_keys_variable_is_a_one_line_error_naming_it(text):
    code, out = _launch("--num-keys", "4", "x.py", env={ENV_CURVE_KEYS: text})
    assert code == 2 and "Traceback" not in out, out
    [line] = [line for line in out.splitlines() if line.startswith("Error:")]
    assert line.startswith(f"Error: {ENV_CURVE_KEYS}: malformed CURVE keys"), out


def test_keys_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    """Opening a FIFO to read blocks until someone writes: the launcher hung for ever."""
    fifo = tmp_path / "keys"
    os.mkfifo(fifo)
    code, out = _launch("--keys-file", str(fifo), "--num-keys", "4", "x.py", timeout=20)
    assert code == 2 and "Traceback" not in out, out
    assert f"--keys-file {fifo}: not a regular file (a FIFO)" in out, out


def test_keys_file_that_is_a_device_or_not_z85_is_refused(tmp_path):
    code, out = _launch("--keys-file", "/dev/zero", "--num-keys", "4", "x.py", timeout=20)
    assert code == 2 and "--keys-file /dev/zero: not a regular file (a device)" in out, out
    bad = tmp_path / "keys"
    bad.write_text(NOT_Z85 + "\n")
    bad.chmod(0o600)
    code, out = _launch("--keys-file", str(bad), "--num-keys", "4", "x.py")
    assert code == 2 and f"--keys-file {bad}: malformed CURVE keys" in out, out


def test_keys_file_readable_by_others_gets_a_warning(tmp_path):
    path = tmp_path / "keys"
    CurveKeys.generate().save(path)
    path.chmod(0o644)
    code, out = _launch("--keys-file", str(path), "--num-keys", "4", "--value-length", "2",
                        SCRIPT, "ok", str(tmp_path), timeout=60)
    assert code == 0, out
    assert f"warning: --keys-file {path} can be read by others than its owner (mode 0644)" \
        in out, out
