"""raydpo on several Ray nodes, beside a second Ray instance, and with a dead cluster recorded on the host.

The clusters are real `ray start` processes on this machine, joined by raydpo drivers run in
subprocesses. All nodes here share one disk, so the node that must not see a run's output runs in a
private mount namespace with an empty tmpfs over the output's parent directory: for that node's
processes the directory is a disk of their own, as a node-local disk is on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import free_port, run_cli, start_ray_node, stop_ray_nodes

import raydpo

PAIRS = 16
TRAIN = ["--micro-batch-size", "1", "--max-steps", "2", "--eval-steps", "none", "--checkpoint-steps", "none"]
PRIVATE_MOUNT = ("unshare", "--mount", "--propagation", "private")


@dataclass
class RayCluster:
    address: str
    temp_dir: Path  # the nodes' temp dirs are head/, second/ and third/ in it
    node_local: Path  # an empty directory of its own for the third node


# Token authentication off in the cluster's nodes and in every process that joins it. Left to Ray, a
# head turns it on where ~/.ray/auth_token exists (Ray writes one when `ray.init()` starts a local
# instance, and sets RAY_AUTH_MODE=token in that process) while a node joining it does not, and the
# join is refused; a driver whose mode differs from the cluster's does not get its work done.
AUTH_OFF = {"RAY_AUTH_MODE": "disabled"}


def ray_env() -> dict[str, str]:
    """The environment of the test's Ray nodes and of processes that join them: no RAY_ADDRESS, and
    token authentication off."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**environment, **AUTH_OFF}


def short_temp_dir(prefix: str) -> Path:
    """A temp dir under /tmp with a short name: Ray's socket paths inside it are length-limited."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="module")
def cache(ray_session, toy_model, sample_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("cluster") / "cache"
    dataset = str(sample_dir / "dpo_en_demo.json")
    raydpo.precompute(model=str(toy_model), dataset=dataset, output=str(output), limit=PAIRS, max_length=256)
    return output


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes: a head with 3 CPUs and a second node with 2, both seeing every path, and a third
    without CPUs (so no training worker or data task runs there) for which `node_local` is a tmpfs. The
    head declares 1 GPU and the third node 2, which nothing here uses: the GPU count of the cluster
    decides the default pool sizes of GPU runs."""
    if subprocess.run([*PRIVATE_MOUNT, "true"], capture_output=True).returncode != 0:
        pytest.skip("no private mount namespaces here (unshare needs CAP_SYS_ADMIN)")
    base = short_temp_dir("rc")
    node_local = tmp_path_factory.mktemp("node_local")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = ray_env()
    nodes = []
    try:
        head = ["--head", f"--port={port}", "--num-cpus=3", "--num-gpus=1", "--include-dashboard=false"]
        nodes.append(start_ray_node(base / "head", *head, env=env))
        joined = ("--address", address)  # one after another: joins at once can overload a busy head
        nodes.append(start_ray_node(base / "second", *joined, "--num-cpus=2", env=env))
        mount_then_run = ("sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(node_local))
        private = (*PRIVATE_MOUNT, *mount_then_run)
        third = ("--num-cpus=0", "--num-gpus=2")
        nodes.append(start_ray_node(base / "third", *joined, *third, env=env, wrapper=private))
        yield RayCluster(address, base, node_local)
    finally:
        stop_ray_nodes(*reversed(nodes))
        shutil.rmtree(base, ignore_errors=True)


def test_a_local_gcs_port_is_chosen_where_neither_ray_nor_the_kernel_hands_out_ports():
    """Between the port's check and the GCS binding it, no Ray worker (10002-19999) and no outgoing
    connection (the kernel's ephemeral range) can take it; each port chosen is free."""
    from raydpo.cluster import GCS_PORTS
    from raydpo.cluster import free_port as gcs_port

    low, high = (int(bound) for bound in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert GCS_PORTS[1] <= low and GCS_PORTS[0] > 19999
    held = []
    try:
        for _ in range(5):
            port = gcs_port()
            assert GCS_PORTS[0] <= port < GCS_PORTS[1]
            held.append(socket.create_server(("", port)))  # free: it binds
    finally:
        for server in held:
            server.close()


def test_two_node_training_publishes_the_model_to_the_driver(cluster, cache, toy_model, tmp_path):
    """Without --num-workers, a CPU run takes one worker per node with CPUs: two here (the third node has
    none), spread so one trains on the second node. The cluster's GPUs, unused, are named once. Rank 0's
    model and the run state reach the driver through the shared output."""
    output = tmp_path / "run"
    ran = run_cli(
        "train", "--model", str(toy_model), "--data", str(cache), "--output", str(output), *TRAIN,
        "--ray-address", cluster.address, env=AUTH_OFF,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "raydpo: 2 training workers: one per node with CPUs (2)" in ran.stderr
    said = "the Ray cluster has 3 GPUs and the training workers run on CPUs: set --use-gpu to use them"
    assert ran.stderr.count(said) == 1
    assert "trained 2 steps" in ran.stdout and "(2 training workers)" in ran.stdout
    assert json.loads((output / "run.json").read_text())["config"]["num_workers"] == 2
    assert (output / "model" / "model.safetensors").exists() and (output / "model" / "_COMPLETE").exists()
    assert json.loads((output / "run.json").read_text())["status"] == "finished"
    assert not list(output.glob(".raydpo-shared-*"))  # the check's markers are gone
    second_node_logs = (cluster.temp_dir / "second").glob("session_*/logs/worker-*.out")
    assert any("RayTrainWorker" in log.read_text(errors="replace") for log in second_node_logs)


def test_precompute_spreads_one_scorer_per_node_with_the_values_of_one(
    cluster, cache, toy_model, sample_dir, tmp_path
):
    """Without --num-actors, a CPU precompute takes one scorer actor per node with CPUs: two here, spread
    so one scores on the second node (the cluster's GPUs, unused, are named once). The values equal
    those of the one-actor output on one node."""
    output = tmp_path / "cache"
    ran = run_cli(
        "precompute", "--model", str(toy_model), "--dataset", str(sample_dir / "dpo_en_demo.json"),
        "--output", str(output), "--limit", str(PAIRS), "--max-length", "256",
        "--ray-address", cluster.address, env=AUTH_OFF,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "raydpo: 2 scorer actors for the train split: one per node with CPUs (2)" in ran.stderr
    said = "the Ray cluster has 3 GPUs and the scorer actors run on CPUs: set --gpus-per-actor 1 to use them"
    assert ran.stderr.count(said) == 1
    spread = raydpo.read_output(str(output))
    assert spread.manifest.throughput.num_actors == 2
    assert spread.manifest.counts == raydpo.read_output(str(cache)).manifest.counts
    assert spread.manifest.key == raydpo.read_output(str(cache)).manifest.key
    frames = [
        raydpo.read_output(str(path)).to_pandas().set_index("pair_id").sort_index()
        for path in (output, cache)
    ]
    assert list(frames[0].index) == list(frames[1].index)  # the same pairs written, the same rejected
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(frames[0][column].values),
            torch.tensor(frames[1][column].values),
            rtol=1e-5,
            atol=1e-4,
        )
    second_node_logs = (cluster.temp_dir / "second").glob("session_*/logs/worker-*.out")
    assert any("ReferenceScorer" in log.read_text(errors="replace") for log in second_node_logs)


def test_gpus_where_torch_has_no_cuda_stop_with_one_line(cluster, cache, toy_model, sample_dir, tmp_path):
    """GPUs given by Ray (the head declares one) where torch is a CPU build, as a plain `pip install
    torch` leaves a GPU node on some platforms: one line naming the node and the cure, instead of a
    scorer running on CPUs at a fraction of the speed, or training failing in Ray Train's NCCL set-up
    ("Distributed package doesn't have NCCL built in")."""
    scores = [
        "precompute", "--model", str(toy_model), "--dataset", str(sample_dir / "dpo_en_demo.json"),
        "--output", str(tmp_path / "cache"), "--limit", str(PAIRS), "--gpus-per-actor", "1",
    ]  # fmt: skip
    trains = [
        "train", "--model", str(toy_model), "--data", str(cache), "--output", str(tmp_path / "run"), *TRAIN,
        "--use-gpu", "--num-workers", "1", "--dtype", "float32",
    ]  # fmt: skip
    for command, who in ((scores, "a reference scorer"), (trains, "a training worker")):
        ran = run_cli(*command, "--ray-address", cluster.address, env=AUTH_OFF, timeout=300)
        assert ran.returncode == 2, ran.stderr[-3000:]
        line = ran.stderr.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"raydpo {command[0]}: error: {who} on node \S+ has GPU 0 from Ray, but torch \S+ sees no CUDA "
            r"device \(a CPU-only build: install a CUDA build of torch on the GPU nodes\)",
            line,
        ), line
        assert "run on CPUs" not in ran.stderr  # GPUs were asked for
    assert not (tmp_path / "cache" / "train" / "manifest.json").exists()
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "mlflow.db").exists()


GPU_POOLS = """
import json
import sys
from raydpo.cluster import init_ray
from raydpo.resources import default_processes
from raydpo.errors import RaydpoError

init_ray(sys.argv[1])
pools = {}
for share, cpus in ((1, 0), (0.5, 0), (0.3, 0), (1.5, 0), (3, 0), (1, 1), (0.5, 1), (0.5, 4)):
    try:
        pools[f"{share}/{cpus}"] = list(default_processes(share, cpus, "gpus_per_actor", "--num-actors"))
    except RaydpoError as error:
        pools[f"{share}/{cpus}"] = str(error)
print(json.dumps(pools))
"""


def test_default_gpu_pools_count_what_each_node_holds(cluster):
    """A GPU stage that sets no count gets as many processes as each node's GPUs hold at its share, and
    its CPUs at the CPUs each reserves: the head declares 1 GPU and 3 CPUs, the third node 2 GPUs and no
    CPUs, so 1.5 GPUs each fit only on the third node, and a process that also takes a CPU only on the
    head."""
    ran = subprocess.run(
        [sys.executable, "-c", GPU_POOLS, cluster.address],
        env=ray_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    pools = json.loads(ran.stdout.strip().splitlines()[-1])
    assert pools["1/0"] == [3, "one per GPU of the cluster (3)"]
    assert pools["0.5/0"] == [6, "as many as the cluster's 3 GPUs hold at 0.5 GPU and 0 CPU each"]
    assert pools["0.3/0"][0] == 3 + 6  # 1 / 0.3 on the head, 2 / 0.3 on the third node
    assert pools["1.5/0"][0] == 1
    assert pools["3/0"] == (
        "gpus_per_actor: the Ray cluster has no node that holds one at 3 GPU and 0 CPU each now; set "
        "--num-actors (an autoscaling cluster then adds the GPU nodes they need)"
    )
    assert pools["1/1"][0] == 1 and pools["0.5/1"][0] == 2  # the head's
    assert pools["0.5/4"].startswith(
        "gpus_per_actor: the Ray cluster has no node that holds one at 0.5 GPU and 4 CPU"
    )


def test_node_local_output_is_refused_before_any_work(cluster, cache, toy_model, reliability):
    """The output is a directory the third node has on a disk of its own: the driver stops before any
    work with one line naming the path and that node, instead of training and then finding no model."""
    output = cluster.node_local / "run"
    started = time.monotonic()
    refused = run_cli(
        "train", "--model", str(toy_model), "--data", str(cache), "--output", str(output), *TRAIN,
        "--num-workers", "2", "--cpus-per-worker", "2", "--ray-address", cluster.address, env=AUTH_OFF,
        timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    raylet_log = next((cluster.temp_dir / "third").glob("session_*/logs/raylet.out")).read_text()
    third = re.search(r"Setting node ID node_id=([0-9a-f]+)", raylet_log).group(1)
    named = rf"raydpo train: error: the output {re.escape(str(output))} is not visible from node \S+ \({third[:12]}\): "
    assert re.match(named, line), line
    assert "a filesystem all nodes mount at the same path, or an s3:// URI" in line
    assert not (output / "run.json").exists() and not (output / "mlflow.db").exists()
    assert not list(output.glob(".raydpo-shared-*"))
    reliability.record(
        "cluster-1-node-local-output",
        "cluster",
        "the output is on a disk of the driver's node only, with three nodes alive",
        "a third Ray node runs in a private mount namespace with an empty tmpfs over the output's parent",
        f"refused in {seconds:.0f} s before the MLflow run or any worker started, naming the path and the "
        "node that cannot see it",
    )


LATE_JOIN_SCRIPT = """
import json, sys
import ray
from raydpo.shared_paths import check_shared_paths, check_visible

ray.init(address=sys.argv[1], log_to_driver=False)
if sys.argv[2] == "driver":  # the driver's check, with the nodes alive now: its markers stay
    print(json.dumps(check_shared_paths({"the output": sys.argv[3]}, {})))
else:  # a writer on the node with the resource "late", before its first write
    @ray.remote(num_cpus=0, resources={"late": 1}, max_retries=0)
    def first_write(markers):
        try:
            check_visible(markers)
        except Exception as error:
            return str(error)
    print(ray.get(first_write.remote(json.loads(sys.argv[3]))))
"""


def test_a_node_that_joins_later_stops_the_first_write_with_one_line(cluster, tmp_path):
    """On an autoscaling cluster a node may join after the driver's check. The driver's markers stay in
    the output for the stage's life, and a writer (or training rank) on a node that joined later, which
    has the output's parent on a disk of its own, stops at its first write with one line naming the
    node and the path."""
    late_local = tmp_path / "late_local"
    output = late_local / "run"
    late_local.mkdir()
    script = tmp_path / "late_join.py"
    script.write_text(LATE_JOIN_SCRIPT)
    environment = {**ray_env(), "PYTHONPATH": str(Path(raydpo.__file__).parents[1])}

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script), cluster.address, *args],
            env=environment,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    markers = run("driver", str(output))  # every node alive now sees the output
    assert [Path(marker).parent for marker in json.loads(markers)] == [output]
    mount_then_run = ("sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(late_local))
    late = start_ray_node(
        cluster.temp_dir / "late", "--address", cluster.address, "--num-cpus=0", '--resources={"late": 1}',
        env=ray_env(), wrapper=(*PRIVATE_MOUNT, *mount_then_run),
    )  # fmt: skip
    try:
        line = run("writer", markers)
    finally:
        stop_ray_nodes(late)
    raylet_log = next((cluster.temp_dir / "late").glob("session_*/logs/raylet.out")).read_text()
    node = re.search(r"Setting node ID node_id=([0-9a-f]+)", raylet_log).group(1)
    named = rf"the output {re.escape(str(output))} is not visible from node \S+ \({node[:12]}\): "
    assert re.match(named, line), line
    assert "a filesystem all nodes mount at the same path, or an s3:// URI" in line


def test_training_beside_another_instance_with_a_dead_cluster_recorded(
    cluster, cache, toy_model, tmp_path, reliability
):
    """With the three-node cluster up as another Ray instance on the host (recorded in its own temp dir
    only), and the address of a head that died without `ray stop` left in <ray temp dir>/ray_current_cluster
    (where `ray.init()` would wait for it forever), `raydpo train` given no address says so in one line,
    starts its own local instance and trains there. Given that dead address, it stops at once with one
    line."""
    ray_tmp = short_temp_dir("rd")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    train = [
        "train",
        "--model",
        str(toy_model),
        "--data",
        str(cache),
        "--output",
        str(tmp_path / "run"),
        *TRAIN,
    ]
    train += ["--num-workers", "1", "--cpus-per-worker", "0.5"]
    try:
        started = time.monotonic()
        ran = run_cli(*train, env={"RAY_TMPDIR": str(ray_tmp)}, timeout=400)
        seconds = time.monotonic() - started
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert "trained 2 steps" in ran.stdout and (tmp_path / "run" / "model" / "_COMPLETE").exists()
        said = [line for line in ran.stderr.splitlines() if dead in line]
        assert len(said) == 1 and "does not answer" in said[0] and "starting a local Ray instance" in said[0]
        assert "Started a local Ray instance" in ran.stderr and cluster.address not in ran.stderr
        assert "Found multiple active Ray instances" not in ran.stderr

        started = time.monotonic()
        again = [*train, "--output", str(tmp_path / "again"), "--ray-address", dead]
        refused = run_cli(*again, env={"RAY_TMPDIR": str(ray_tmp)}, timeout=60)
        refused_in = time.monotonic() - started
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (
            f"raydpo train: error: no Ray cluster answers at {dead} (--ray-address): start it "
            "(`ray start --head`), or leave --ray-address out to run on a local instance"
        )
        assert refused_in < 45  # the CLI's imports, the cache checks and a 3 s probe; no Ray start
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    reliability.record(
        "cluster-2-dead-recorded-head",
        "cluster",
        "a Ray head died without `ray stop` (its address stays in ray_current_cluster), another Ray "
        "instance runs on the host",
        "`raydpo train` with a RAY_TMPDIR whose ray_current_cluster names a port nothing listens on, while "
        "a three-node cluster runs beside it",
        f"one log line naming the dead address; its own local instance started and the run finished in "
        f"{seconds:.0f} s (Ray itself would wait forever); with that address as --ray-address: exit 2 with "
        f"one line in {refused_in:.0f} s",
    )


LOOKUP = """
import json
import ray
from raydpo.cluster import init_ray

address = init_ray(None, num_cpus=1, include_dashboard=False)

@ray.remote(num_cpus=0)
def lookup():  # how Ray's State API (Train's placement-group cleaner) finds the cluster in a worker
    from ray._private.services import canonicalize_bootstrap_address_or_die
    return canonicalize_bootstrap_address_or_die(None)

print(json.dumps({"address": address, "lookup": ray.get(lookup.remote())}))
"""


def test_address_lookups_inside_the_job_find_the_instance_joined(cluster):
    """With another Ray instance on the host, Ray's lookup of an unspecified address (what the State API
    does in Ray Train's placement-group cleaner) fails in a worker ("Found multiple active Ray
    instances") unless the address joined is pinned in the job's runtime env."""
    ray_tmp = short_temp_dir("rs")
    try:
        ran = subprocess.run(
            [sys.executable, "-c", LOOKUP],
            env={**ray_env(), "RAY_TMPDIR": str(ray_tmp)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    found = json.loads(ran.stdout.strip().splitlines()[-1])
    assert found["address"].rpartition(":")[2] != cluster.address.rpartition(":")[2]
    assert found["lookup"] == found["address"]
