#!/usr/bin/python3
"""examples/cluster: the shell scripts parse (bash -n); the Kubernetes
manifest loads, its headless Service, StatefulSet and Indexed Job agree on
names and counts, and the TF_CONFIG each pod builds (run through the pod's
own shell command, for every pod index) is accepted by the real binaries:
distval-ps takes the right shard of the right job from it, distval-worker
the right worker index. Run by meson with BUILD_DIR set."""
import json
import os
import subprocess
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("BUILD_DIR", os.path.join(ROOT, "build"))
CLUSTER = os.path.join(ROOT, "examples", "cluster")


def pod_tf_config(script, env):
    """Runs a pod's shell command with `exec BINARY ...` captured: returns
    (binary, args, TF_CONFIG)."""
    with tempfile.TemporaryDirectory() as bin_dir:
        for name in ["distval-ps", "distval-worker"]:
            path = os.path.join(bin_dir, name)
            with open(path, "w") as f:
                f.write('#!/bin/sh\nprintf "%s\\n" "$0" "$TF_CONFIG" "$@"\n')
            os.chmod(path, 0o755)
        full_env = dict(os.environ, PATH=bin_dir + ":" + os.environ["PATH"], **env)
        out = subprocess.run(["/bin/sh", "-c", script], env=full_env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout.split("\n")
    return os.path.basename(out[0]), [a for a in out[2:] if a], json.loads(out[1])


class ClusterExamplesTest(unittest.TestCase):
    def test_shell_scripts_parse(self):
        for name in ["slurm.sbatch", "mpirun.sh"]:
            subprocess.run(["bash", "-n", os.path.join(CLUSTER, name)], check=True)
            with open(os.path.join(CLUSTER, name)) as f:
                self.assertIn("distval-rank --num-ps 2 --rendezvous", f.read())

    def test_kubernetes_manifest(self):
        try:
            import yaml
        except ImportError:
            self.skipTest("PyYAML not installed")
        with open(os.path.join(CLUSTER, "kubernetes.yaml")) as f:
            docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
        self.assertEqual(set(docs), {"Service", "StatefulSet", "Job"})
        svc, sts, job = docs["Service"], docs["StatefulSet"], docs["Job"]
        self.assertEqual(svc["spec"]["clusterIP"], "None")  # headless
        self.assertEqual(sts["spec"]["serviceName"], svc["metadata"]["name"])
        self.assertEqual(job["spec"]["completionMode"], "Indexed")
        num_ps = sts["spec"]["replicas"]
        num_workers = job["spec"]["completions"]
        ps_names = [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:2222"
                    for i in range(num_ps)]
        ps_script = sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
        worker_script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]

        for i in range(num_ps):
            binary, args, tf = pod_tf_config(ps_script, {"HOSTNAME": f"distval-ps-{i}"})
            self.assertEqual(binary, "distval-ps")
            self.assertEqual(tf["task"], {"type": "ps", "index": i})
            self.assertEqual(tf["cluster"]["ps"], ps_names)
            self.assertEqual(len(tf["cluster"]["worker"]), num_workers)
            self.assertIn("--tf-config", args)
            self.check_ps_accepts(tf, i, num_ps, num_workers)
        for w in range(num_workers):
            binary, args, tf = pod_tf_config(worker_script, {"JOB_COMPLETION_INDEX": str(w)})
            self.assertEqual(binary, "distval-worker")
            self.assertEqual(tf["task"], {"type": "worker", "index": w})
            self.assertEqual(tf["cluster"]["ps"], ps_names)
            self.check_worker_accepts(tf, w, num_workers)

    def check_ps_accepts(self, tf, index, num_ps, num_workers):
        """The real distval-ps starts as shard `index` of `num_ps` from this
        TF_CONFIG (bound to loopback here instead of the pod's address)."""
        with tempfile.TemporaryDirectory() as tmp:
            port_file = os.path.join(tmp, "endpoint")
            env = dict(os.environ, TF_CONFIG=json.dumps(tf))
            p = subprocess.Popen([os.path.join(BUILD, "ps", "distval-ps"), "--tf-config", "--bind",
                                  "tcp://127.0.0.1:0", "--port-file", port_file], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.time() + 20
                while not os.path.exists(port_file) and p.poll() is None and time.time() < deadline:
                    time.sleep(0.02)
            finally:
                p.terminate()
                out = p.communicate(timeout=20)[0]
            self.assertIn(f"role=ps index={index} num_shards={num_ps}", out)
            self.assertIn(f"num_workers={num_workers}", out)

    def check_worker_accepts(self, tf, index, num_workers):
        """distval-worker reads its index and the job from this TF_CONFIG
        (its start line comes before it connects; the servers do not exist
        here, so it is stopped there)."""
        env = dict(os.environ, TF_CONFIG=json.dumps(tf))
        p = subprocess.Popen([os.path.join(BUILD, "worker", "distval-worker"), "--tf-config",
                              "--train-limit", "64"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        line = p.stdout.readline()
        p.kill()
        p.communicate(timeout=20)
        self.assertIn(f"role=worker index={index} num_workers={num_workers}", line)
        self.assertIn("ps=tcp://distval-ps-0.distval-ps:2222,tcp://distval-ps-1.distval-ps:2222",
                      line)


if __name__ == "__main__":
    unittest.main()
