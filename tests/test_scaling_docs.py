"""The scale-out documentation runs: every command it shows parses with the real parsers.

The README's "Scaling out" section, the Slurm script and the Kubeflow manifest are what a
user copies; a renamed flag or config field would break them silently. So their Foundry
commands are parsed with ``foundry_kernel.cli.build_parser`` (torchrun's with
``torch.distributed.run.get_args_parser``), their ``--set`` values and configs are
validated with ``foundry_kernel.config.load_config``, and the manifest is checked for what
Kubeflow needs and for what it must never ask for. ``bench.gpu_check --dry-run`` is run
for real, without a GPU. All of it takes seconds.

The launch flags (``--nproc-per-node`` ...) are added to ``foundry distill`` by a parallel
change. Until the real parser has them, :func:`parse_foundry` checks them against
:data:`LAUNCH_FLAGS` (the flags issue 12 specifies) and parses the rest for real; once the
parser has them, everything is parsed by it and the list must match.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from foundry_kernel.cli import build_parser
from foundry_kernel.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
SBATCH = EXAMPLES / "foundry-slurm.sbatch"
MANIFEST = EXAMPLES / "foundry-pytorchjob.yaml"
# issue 12's launch flags of `foundry distill`, each taking one value
LAUNCH_FLAGS = (
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--rdzv-endpoint",
    "--rdzv-id",
    "--master-port",
)


def _distill_options() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    distill = sub.choices["distill"]
    return {o for a in distill._actions for o in a.option_strings}


def parse_foundry(argv: list[str]) -> argparse.Namespace:
    """``foundry distill ...`` (or ``python -m foundry_kernel distill ...``) parsed by the
    real CLI parser; launch flags the parser does not have yet are checked by name."""
    if argv[:1] == ["foundry"]:
        argv = argv[1:]
    elif argv[1:3] == ["-m", "foundry_kernel"]:
        argv = argv[3:]
    assert argv[:1] == ["distill"], argv
    known = _distill_options()
    rest: list[str] = []
    it = iter(argv)
    for token in it:
        flag = token.split("=", 1)[0]
        if flag in LAUNCH_FLAGS and flag not in known:
            if "=" not in token:
                value = next(it)
                assert not value.startswith("-"), f"{flag} needs a value, got {value}"
            continue
        rest.append(token)
    return build_parser().parse_args(rest)


def test_the_launch_flag_list_matches_the_parser_once_it_has_them() -> None:
    present = [f for f in LAUNCH_FLAGS if f in _distill_options()]
    assert present in ([], list(LAUNCH_FLAGS)), f"only some launch flags exist: {present}"


def _check_overrides(ns: argparse.Namespace, base: Any = None) -> None:
    """The command's ``--set`` values against the real schema (on ``base`` or defaults)."""
    cfg = load_config(base, list(ns.overrides))
    for item in ns.overrides:
        key, _, value = item.partition("=")
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node) == value, (key, node, value)


# --------------------------------------------------------------------------- Slurm


def _sbatch_text() -> str:
    return SBATCH.read_text(encoding="utf-8")


def _sbatch_command() -> list[str]:
    """The FOUNDRY=( ... ) array, its variables replaced by sample values."""
    text = _sbatch_text()
    body = re.search(r"^FOUNDRY=\(\n(.*?)^\)", text, re.S | re.M)
    assert body, "the script keeps its Foundry command in a FOUNDRY=( ... ) array"
    tokens = shlex.split(body.group(1), comments=True)
    sample = {
        "GPUS_PER_NODE": "8",
        "SLURM_NNODES": "2",
        "HEAD_NODE": "node0",
        "RDZV_PORT": "29500",
        "SLURM_JOB_ID": "4242",
        "CONFIG": "/shared/foundry.yaml",
        "RUNS_DIR": "/shared/runs",
    }
    defined = set(re.findall(r"^([A-Z_]+)=", text, re.M)) | {"SLURM_NNODES", "SLURM_JOB_ID"}
    out = []
    for token in tokens:
        for name in re.findall(r"\$\{?([A-Z_]+)\}?", token):
            assert name in defined, f"${name} is used but never set"
            token = re.sub(rf"\$\{{?{name}\}}?", sample[name], token)
        out.append(token)
    return out


def test_slurm_script_runs_one_foundry_agent_per_node_with_c10d_on_the_first() -> None:
    text = _sbatch_text()
    assert text.startswith("#!/bin/bash\n")
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    srun = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert srun == ['srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${FOUNDRY[@]}"']
    argv = _sbatch_command()
    assert argv[:2] == ["foundry", "distill"]
    flags = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert flags["--rdzv-endpoint"] == "node0:29500"
    assert flags["--nnodes"] == "2" and flags["--nproc-per-node"] == "8"
    assert flags["--rdzv-id"] == "4242"


def test_slurm_command_parses_and_its_settings_exist() -> None:
    ns = parse_foundry(_sbatch_command())
    assert ns.command == "distill" and ns.json
    assert str(ns.config) == "/shared/foundry.yaml"
    assert "distributed.strategy=fsdp2" in ns.overrides
    _check_overrides(ns)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_slurm_script_is_valid_bash() -> None:
    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run(
        [bash, "-n", str(SBATCH)], capture_output=True, text=True, timeout=10, check=False
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Kubernetes


def _manifest() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")))


def _job() -> dict[str, Any]:
    return next(d for d in _manifest() if d["kind"] == "PyTorchJob")


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(replica type, pod spec, the 'pytorch' container) for every replica type."""
    out = []
    for role, replica in _job()["spec"]["pytorchReplicaSpecs"].items():
        pod = replica["template"]["spec"]
        out.append((role, pod, next(c for c in pod["containers"] if c["name"] == "pytorch")))
    return out


def test_manifest_is_a_pytorchjob_kubeflow_accepts() -> None:
    job = _job()
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for role, pod, container in _containers():
        assert specs[role]["restartPolicy"] in {"Never", "OnFailure", "ExitCode"}
        assert container["image"], role
        assert all(isinstance(x, str) for x in container["command"] + container["args"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert pod["containers"][0]["name"] == "pytorch"  # the operator's required name


def _torchrun(container: dict[str, Any]) -> tuple[argparse.Namespace, list[str]]:
    from torch.distributed.run import get_args_parser

    assert container["command"] == ["torchrun"]
    ns = get_args_parser().parse_args(container["args"])
    assert ns.module and ns.training_script == "foundry_kernel"
    return ns, [ns.training_script, *ns.training_script_args]


def test_manifest_command_parses_with_torchrun_and_foundry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_map = next(d for d in _manifest() if d["kind"] == "ConfigMap")
    config = yaml.safe_load(config_map["data"]["foundry.yaml"])
    commands = set()
    for _role, pod, container in _containers():
        ns, program = _torchrun(container)
        assert ns.nproc_per_node == _job()["spec"]["nprocPerNode"]
        args = parse_foundry(["foundry", *program[1:]])
        assert args.json and str(args.config) == "/etc/foundry/foundry.yaml"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "persistentVolumeClaim" in volumes[mounts[str(args.runs_dir)]]  # shared runs
        assert "configMap" in volumes[mounts["/etc/foundry"]]
        # the config is valid in the pod's environment (its allowed roots, its runs folder)
        for var in container["env"]:
            monkeypatch.setenv(var["name"], var["value"])
        cfg = load_config(config, [f"runs_dir={args.runs_dir}"])
        assert cfg.distributed.strategy == "fsdp2" and cfg.teacher.placement == "shard"
        commands.add(json.dumps(container["command"] + container["args"]))
    assert len(commands) == 1, "every pod runs the same command"


def test_manifest_sizes_dev_shm_in_memory() -> None:
    for _role, pod, container in _containers():
        shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        assert re.fullmatch(r"\d+Gi", volume["emptyDir"]["sizeLimit"])


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [
            kv for k, v in node.items() for kv in [(f"{path}.{k}", v), *_walk(v, f"{path}.{k}")]
        ]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _walk(v, f"{path}[{i}]")]
    return []


def test_manifest_asks_for_no_privilege() -> None:
    text = MANIFEST.read_text(encoding="utf-8")
    assert "docker.sock" not in text and "containerd.sock" not in text
    for doc in _manifest():
        for path, value in _walk(doc):
            key = path.rsplit(".", 1)[-1]
            assert key not in {"privileged", "hostNetwork", "hostPID", "hostIPC", "hostPath"}, path
            if key == "allowPrivilegeEscalation":
                assert value is False, path
    for _role, pod, container in _containers():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


# --------------------------------------------------------------------------- README


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Scaling out\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README has a 'Scaling out' section"
    return match.group(1)


def _readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", _readme_section(), re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
    return [shlex.split(ln) for ln in lines]


def test_readme_scaling_commands_use_existing_flags_and_fields() -> None:
    from torch.distributed.run import get_args_parser

    commands = _readme_commands()
    seen = {argv[0] for argv in commands}
    assert {"foundry", "torchrun", "sbatch", "kubectl"} <= seen
    for argv in commands:
        if argv[0] == "foundry":
            _check_overrides(parse_foundry(argv))
        elif argv[0] == "torchrun":
            ns = get_args_parser().parse_args(argv[1:])
            assert ns.module and ns.training_script == "foundry_kernel"
            _check_overrides(parse_foundry(["foundry", *ns.training_script_args]))
        else:  # sbatch FILE / kubectl apply -f FILE: the shipped examples
            assert (ROOT / argv[-1]).is_file(), argv
    multi = [a for a in commands if a[0] == "foundry" and "--nnodes" in a]
    assert multi and all("--rdzv-endpoint" in a for a in multi)


def test_readme_documents_the_json_fields_and_batch_semantics() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "| `world_size`, `strategy` |" in text
    assert "`optim.batch_size` is the **global**" in _readme_section()
    assert "nproc_per_node=" in _readme_section()


# --------------------------------------------------------------------------- gpu check


def test_gpu_check_dry_run_plans_every_step_and_skips_gpu_steps_honestly(tmp_path: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine with one
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert (tmp_path / "gpu-check.log").is_file()
    steps = {s["name"]: s for s in doc["steps"]}
    assert list(steps) == ["environment", "cuda_tests", "nccl_smoke", "loss_128k", "mfu_bf16"]
    for step in steps.values():
        assert f"argv: {json.dumps(step['argv'])}" in proc.stdout
        if step["needs_cuda"]:
            assert step["status"] == "skipped: no CUDA device", step
            assert step["rc"] is None and step["wall_s"] is None
    assert steps["environment"]["details"]["cuda_available"] is False
    assert doc["passed"] is False and doc["meta"]["dry_run"] is True
    assert sum(s["timeout_s"] for s in doc["steps"]) <= 540


def test_gpu_check_steps_parse_and_reference_existing_fields(tmp_path: Path) -> None:
    from bench import gpu_check, loss_memory
    from bench.__main__ import build_parser as bench_parser

    steps = {s.name: s for s in gpu_check.plan(tmp_path, python="python3")}
    smoke = list(steps["nccl_smoke"].argv)
    ns = parse_foundry(smoke)
    assert ns.json and smoke[smoke.index("--nproc-per-node") + 1] == "1"
    assert {"device=cuda", "distributed.backend=nccl"} <= set(ns.overrides)
    cfg = load_config(gpu_check.SMOKE_CONFIG, [*ns.overrides, f"runs_dir={tmp_path}"])
    assert cfg.limits.max_steps <= 5 and cfg.device == "cuda"
    loss = bench_parser().parse_args(list(steps["loss_128k"].argv[3:]))
    assert loss.which == "loss" and loss.device == "cuda" and loss.vocabs == [128256]
    assert {"liger_jsd", "liger_fused_jsd", "ours_fused_kl"} <= set(loss.loss_contenders)
    assert set(loss.loss_contenders) <= set(loss_memory.BY_NAME)
    mfu = bench_parser().parse_args(list(steps["mfu_bf16"].argv[3:]))
    assert mfu.which == "mfu" and mfu.device == "cuda"
    tests = [a for a in steps["cuda_tests"].argv if a.startswith("tests/")]
    assert tests and all("pytest.mark.cuda" in (ROOT / t).read_text() for t in tests)


# the packages the GPU machine's image holds (device KINDS.md), of Foundry's engine deps
IMAGE_HAS = {"torch", "transformers", "tokenizers", "safetensors", "pyyaml", "psutil"}
IMAGE_HAS |= {"nvidia-ml-py", "httpx", "peft", "pandas"}
LAZY = {"datasets"}  # imported only for a Hugging Face dataset source


def test_gpu_wheels_cover_what_the_machine_lacks() -> None:
    import tomllib

    from bench import gpu_check

    reqs = gpu_check.wheel_requirements()
    names = {r.split("==")[0] for r in reqs}
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"} <= names
    assert "liger-kernel" in names
    assert len(names) == len(reqs), "one version of each wheel"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    engine = {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in deps}
    workbench = {"ipywidgets", "ipykernel", "plotly", "anywidget", "papermill", "jupyterlab"}
    missing = engine - IMAGE_HAS - LAZY - workbench - {"voila"}
    assert missing <= names, f"no wheel for {missing - names}"
    argv = gpu_check.download_command()
    assert argv[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in argv and argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[-len(reqs) :] == reqs


def test_gpu_check_judges_the_smoke_by_its_json() -> None:
    """A completed run without ``world_size`` (launch flags missing) is not an ``ok``."""
    from bench.gpu_check import Ran, check_smoke

    good = {"run_id": "r", "state": "completed", "world_size": 1, "strategy": "ddp"}
    assert check_smoke(Ran(0, 1.0, "progress\n" + json.dumps(good), False))[0] == "ok"
    old = {"run_id": "r", "state": "completed"}
    status, _ = check_smoke(Ran(0, 1.0, json.dumps(old), False))
    assert status.startswith("failed") and "world_size" in status
    assert check_smoke(Ran(None, 9.0, "", True))[0].startswith("timeout")
